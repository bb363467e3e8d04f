#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for the build: libclang (bindgen, for RocksDB).
# protoc is not needed: proto/build.rs compiles the .proto files with protox (pure Rust).
# Prints one line per step. `--check` installs nothing: it fails, naming the command to run,
# when something the build needs is missing (the test command runs it after installing).
set -euo pipefail
here="$(dirname "$0")"
. "$here/lib-setup.sh"

if has_libclang; then
  step "libclang: found ($(libclang_path))"
elif [ "${1:-}" = --check ]; then
  fail "libclang-dev is not installed (bindgen needs libclang.so and clang's headers to build RocksDB): run 'apt-get install libclang-dev'"
else
  apt_install libclang-dev "libclang for RocksDB's bindgen"
  has_libclang || fail "libclang-dev installed but no libclang.so found: run 'apt-get install --reinstall libclang-dev'"
  step "libclang: installed ($(libclang_path))"
fi

# The two-site test puts sites in network namespaces and partitions them with `ip` (iproute2).
if command -v ip >/dev/null 2>&1 && ip -V >/dev/null 2>&1; then
  step "ip (iproute2): found"
elif [ "${1:-}" = --check ]; then
  fail "the \`ip\` command is missing (the two-site network-namespace test needs it): run 'apt-get install iproute2'"
else
  apt_install iproute2 "ip, for the two-site network-namespace test"
  command -v ip >/dev/null 2>&1 || fail "iproute2 installed but no \`ip\` command found"
  step "ip (iproute2): installed"
fi
