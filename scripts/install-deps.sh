#!/usr/bin/env bash
# Installs what a fresh machine lacks for the build: libclang (bindgen for RocksDB).
# protoc is not needed: agent/build.rs compiles the .proto files with protox (pure Rust).
set -euo pipefail
if ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ldconfig -p 2>/dev/null | grep -q libclang; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  echo "==> installing libclang-dev (bindgen for RocksDB)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
else
  echo "libclang is missing: run 'sudo apt-get install libclang-dev' and try again" >&2
  exit 2
fi
