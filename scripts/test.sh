#!/usr/bin/env bash
# Set everything up on a fresh machine and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The systemd unit's tests run systemd-analyze (verify, security, syscall-filter) and
# systemctl --root; neither needs systemd to be running, only its package.
if ! command -v systemd-analyze >/dev/null || ! command -v systemctl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
  else
    echo "Warning: systemd-analyze is missing, and the unit's tests need it: sudo apt-get install systemd" >&2
  fi
fi
scripts/setup.sh train,test
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
