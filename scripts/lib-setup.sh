# Shared by the set-up scripts (sourced, not run). Every "is it installed?" check tests the
# thing itself — the library the build loads, the command the test runs — never a file glob a
# neighbouring package also matches (libclang-cpp.so.14 is not libclang).

step() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 2; }

# The libclang shared object clang-sys loads: libclang.so, libclang.so.N, libclang-N.so(.N),
# never libclang-cpp*. LIBCLANG_PATH, when set, is where bindgen looks first.
libclang_path() {
  local dirs=() d f
  [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
  dirs+=(/usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib /usr/local/lib)
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang*.so*; do
      [ -e "$f" ] || continue
      if [[ "$(basename "$f")" =~ ^libclang(-[0-9.]+)?\.so(\.[0-9]+)*$ ]]; then
        echo "$f"
        return 0
      fi
    done
  done
  return 1
}
# bindgen needs the shared object and clang's own headers (stddef.h…): on Debian both come with
# libclang-dev, so there the package is what is checked (libclang1-NN alone, left behind by a
# removed libclang-dev, loads but cannot parse RocksDB's headers). Elsewhere: the library.
has_libclang() {
  if command -v dpkg-query >/dev/null 2>&1; then
    dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'install ok installed' || return 1
  fi
  libclang_path >/dev/null
}

apt_updated=0
# apt_install PACKAGE WHY: installs a Debian package as root, or says what to run.
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    fail "$2 is missing: run 'sudo apt-get install $1' and try again"
  fi
  if [ "$apt_updated" = 0 ]; then
    step "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
  fi
  step "installing $1 ($2)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null \
    || fail "apt-get install $1 failed"
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' \
    || fail "$1 is still not installed: run 'apt-get install $1'"
}

# ensure_venv DIR: a virtualenv in DIR whose pip runs (made anew if broken), installing Debian's
# python3-venv first when the machine lacks it.
ensure_venv() {
  "$1/bin/python" -m pip --version >/dev/null 2>&1 && return 0
  rm -rf "$1"
  if ! python3 -m venv "$1" >/dev/null 2>&1; then
    rm -rf "$1"
    apt_install python3-venv "python's virtualenv module"
    python3 -m venv "$1" >&2 || fail "python3 -m venv still fails: run 'apt-get install python3-venv'"
  fi
  step "created virtualenv $1"
}
