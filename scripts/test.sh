#!/usr/bin/env bash
# Set everything up on a fresh machine and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests run for real: systemd-analyze and systemctl --root for the unit's tests
# (systemd need not be running, only installed), mosquitto for the MQTT sink's broker, chromium (and a
# font for it to draw text with) for the browser check of the HTML report.
missing=()
command -v systemd-analyze >/dev/null && command -v systemctl >/dev/null || missing+=(systemd)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "Warning: the tests need these Debian packages: sudo apt-get install ${missing[*]}" >&2
  fi
fi
scripts/setup.sh train,test
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
