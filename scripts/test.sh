#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the build needs, then runs every test.
# Usage: bash scripts/test.sh        (as root, or with the packages below already installed)
set -euo pipefail
cd "$(dirname "$0")/.."

# librocksdb-sys generates its bindings with bindgen, which needs libclang at build time.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libclang; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing libclang-dev (bindgen for RocksDB)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    echo "libclang is missing: run 'sudo apt-get install libclang-dev' and try again" >&2
    exit 2
  fi
fi
# protoc is not needed: agent/build.rs parses the .proto files with protox (pure Rust).

# Cargo's target dir may live outside the clone so later runs reuse the RocksDB build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

start=$(date +%s)
echo "==> build (dev profile; dependencies optimised)"
cargo build --workspace --all-targets --locked
echo "==> build took $(( $(date +%s) - start )) s"
echo "==> tests"
cargo nextest run --workspace --locked --no-fail-fast
cargo test --workspace --doc --locked
echo "==> all tests passed in $(( $(date +%s) - start )) s"
