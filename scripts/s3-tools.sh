#!/usr/bin/env bash
# Installs the real S3 clients the gateway tests and benchmark drive: boto3 and the AWS CLI
# (PyPI, into a virtualenv) and rclone (Debian). Prints two lines on stdout: the virtualenv's
# python, then rclone's path; one line per set-up step on stderr. Reuses both on later runs.
set -euo pipefail
. "$(dirname "$0")/lib-setup.sh"
VENV="${SHARDFARM_S3_VENV:-$HOME/.cache/shardfarm-s3-venv}"
# Installed means: boto3 imports and the AWS CLI runs (not: a file with that name exists).
clients_ok() {
  "$VENV/bin/python" -c 'import boto3' >/dev/null 2>&1 && "$VENV/bin/aws" --version >/dev/null 2>&1
}
if ! clients_ok; then
  ensure_venv "$VENV"
  step "installing boto3 and awscli into $VENV (PyPI)"
  "$VENV/bin/pip" install -q --disable-pip-version-check boto3 awscli >&2 \
    || fail "pip install boto3 awscli failed (is PyPI reachable?)"
  clients_ok || fail "boto3/aws do not run from $VENV; delete it and try again"
fi
if ! rclone version >/dev/null 2>&1; then
  apt_install rclone "rclone"
  rclone version >/dev/null 2>&1 || fail "rclone does not run after installing it"
fi
step "S3 clients: $VENV (boto3, aws), $(command -v rclone)"
echo "$VENV/bin/python"
command -v rclone
