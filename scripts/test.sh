#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the build needs, then runs every test.
# Usage: bash scripts/test.sh        (as root, or with the packages below already installed)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> set-up: what the build needs (first run on a fresh machine: apt-get, ~1 min)"
bash scripts/install-deps.sh
# Fails loudly, naming the package, if a set-up step was skipped wrongly (bindgen would otherwise
# fail deep inside librocksdb-sys's build script after minutes of compiling).
bash scripts/install-deps.sh --check
# The real S3 clients the gateway test drives: boto3 + AWS CLI (PyPI), rclone (Debian).
bash scripts/s3-tools.sh >/dev/null
# helm, promtool and the prometheus server (Debian): the live dashboards test runs prometheus, so
# this comes before the tests.
HELM=$(bash scripts/chart-tools.sh)

# Cargo's target dir may live outside the clone so later runs reuse the RocksDB build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

start=$(date +%s)
# One build: what the tests need (libraries, binaries, tests, examples), built by nextest itself
# and timed apart from the run. Benches are not built: no test runs them (`cargo clippy
# --all-targets` and the bench scripts do).
echo "==> build (dev profile, dependencies optimised; a cold build compiles RocksDB's C++: ~15-20 min on 2 cores)"
cargo nextest run --workspace --locked --no-run
echo "==> build took $(( $(date +%s) - start )) s"
echo "==> tests (fuzz/lib's corpus tests replay every committed fuzz input through its target)"
# The two-site test needs root for its network namespaces: here it must run, not skip.
if [ "$(id -u)" = 0 ]; then export SHARDFARM_REQUIRE_NETNS=1; fi
cargo nextest run --workspace --locked --no-fail-fast
echo "==> manifests: CRDs and examples against the Kubernetes schemas, custom resources against their CRDs"
PY=$(bash scripts/manifest-tools.sh)
"$PY" scripts/validate-manifests.py .
echo "==> chart, alerts and dashboards: helm lint/template, kubernetes-validate, promtool"
"$PY" scripts/check-chart.py "$HELM" .
echo "==> all tests passed in $(( $(date +%s) - start )) s"
