#!/usr/bin/env bash
# Installs the offline manifest validators (PyPI kubernetes-validate and check-jsonschema) into
# a virtualenv and prints its python on stdout, one line per set-up step on stderr. Reuses the
# virtualenv on later runs.
set -euo pipefail
. "$(dirname "$0")/lib-setup.sh"
VENV="${SHARDFARM_VENV:-$HOME/.cache/shardfarm-venv}"
# Installed means: the venv's python imports both packages (not: a file with that name exists).
validators_ok() {
  "$VENV/bin/python" -c 'import kubernetes_validate, check_jsonschema' >/dev/null 2>&1
}
if ! validators_ok; then
  ensure_venv "$VENV"
  step "installing kubernetes-validate and check-jsonschema into $VENV (PyPI)"
  "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate check-jsonschema >&2 \
    || fail "pip install kubernetes-validate check-jsonschema failed (is PyPI reachable?)"
  validators_ok || fail "kubernetes-validate/check-jsonschema do not import in $VENV; delete it and try again"
fi
step "manifest validators: $VENV"
echo "$VENV/bin/python"
