#!/usr/bin/env bash
# Installs the Python tools the checks run into a virtualenv and prints its python on stdout,
# one line per set-up step on stderr. Reuses the virtualenv on later runs. The tools:
# - the offline manifest validators (PyPI kubernetes-validate and check-jsonschema);
# - Grafana's dashboard builders (PyPI grafana-foundation-sdk), which dashboards/generate.py
#   uses and scripts/check-chart.py reruns to compare with the committed JSON;
# - with --render only: matplotlib, which scripts/render-dashboards.py draws the dashboards with
#   (no check of the test command draws, so it does not install matplotlib and numpy).
# Usage: bash scripts/manifest-tools.sh [--render]
set -euo pipefail
. "$(dirname "$0")/lib-setup.sh"
VENV="${SHARDFARM_VENV:-$HOME/.cache/shardfarm-venv}"
# Exact pins. The committed dashboards must equal the generator's output byte for byte, and
# another SDK release writes other field defaults (or another schemaVersion). 0.0.x is the
# SDK's current line (its main branch, Grafana 12 schemas). Unpinned, pip would pick
# 1769699998!10.1.0: the older per-Grafana-version releases carry an epoch, which sorts above
# every 0.0.x, and the highest epoch is the Grafana 10.1 build.
GRAFANA_SDK=0.0.21
MATPLOTLIB=3.11.2
packages=(kubernetes-validate check-jsonschema "grafana-foundation-sdk==$GRAFANA_SDK")
what="manifest validators, grafana-foundation-sdk $GRAFANA_SDK"
render=0
case "${1:-}" in
  "") ;;
  --render) render=1; packages+=("matplotlib==$MATPLOTLIB"); what+=", matplotlib $MATPLOTLIB" ;;
  *) fail "unknown option $1 (usage: bash scripts/manifest-tools.sh [--render])" ;;
esac
# Installed means: the venv's python imports every tool, at the pinned versions (not: a file
# with that name exists).
tools_ok() {
  "$VENV/bin/python" - "$GRAFANA_SDK" "$MATPLOTLIB" "$render" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
import check_jsonschema, grafana_foundation_sdk, kubernetes_validate  # noqa: F401
# The SDK's wheel records its version as "v0.0.21".
pins = {"grafana_foundation_sdk": sys.argv[1]}
if sys.argv[3] == "1":
    import matplotlib  # noqa: F401
    pins["matplotlib"] = sys.argv[2]
sys.exit(any(version(name).lstrip("v") != want for name, want in pins.items()))
PY
}
if ! tools_ok; then
  ensure_venv "$VENV"
  step "installing ${packages[*]} into $VENV (PyPI)"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${packages[@]}" >&2 \
    || fail "pip install of the check tools failed (is PyPI reachable?)"
  tools_ok || fail "the check tools do not import at the pinned versions in $VENV; delete it and try again"
fi
step "check tools ($what): $VENV"
echo "$VENV/bin/python"
