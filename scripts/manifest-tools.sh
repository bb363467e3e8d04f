#!/usr/bin/env bash
# Installs the offline manifest validators (PyPI kubernetes-validate and check-jsonschema) into
# a virtualenv and prints its python. Reuses the virtualenv on later runs.
set -euo pipefail
VENV="${SHARDFARM_VENV:-$HOME/.cache/shardfarm-venv}"
if [ ! -x "$VENV/bin/check-jsonschema" ] || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "==> installing python3-venv" >&2
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$VENV"
      python3 -m venv "$VENV" >&2
    else
      echo "python3-venv is missing: run 'sudo apt-get install python3-venv'" >&2
      exit 2
    fi
  fi
  echo "==> installing kubernetes-validate and check-jsonschema into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate check-jsonschema >&2
fi
echo "$VENV/bin/python"
