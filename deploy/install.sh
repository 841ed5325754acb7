#!/usr/bin/env bash
# Install edge-inspect on a line PC into its own virtual environment.
#
#   sudo deploy/install.sh            # lean runtime (CPU), from this checkout
#   sudo deploy/install.sh --gpu      # runtime with the CUDA execution provider
#   sudo deploy/install.sh --train    # also the training side (TensorFlow)
#   sudo deploy/install.sh --service  # also the systemd service (edge-inspect watch)
#   deploy/install.sh --print-unit    # print the service unit for PREFIX; install nothing
#
# Environment: PREFIX (default /opt/edge-inspect), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${PREFIX:-/opt/edge-inspect}"
python="${PYTHON:-python3}"
extras=""
gpu=0
service=0
print_unit=0
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    --train) extras="${extras:+$extras,}train" ;;
    --service) service=1 ;;
    --print-unit) print_unit=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "Error: unknown option '$arg'. Use --gpu, --train, --service or --print-unit." >&2; exit 2 ;;
  esac
done

# The unit as shipped runs /opt/edge-inspect/bin/edge-inspect; point it at PREFIX.
render_unit() {
  sed "s#/opt/edge-inspect/bin/edge-inspect#$prefix/bin/edge-inspect#g" "$here/deploy/edge-inspect.service"
}

if [ "$print_unit" = 1 ]; then
  render_unit
  exit 0
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Error: edge-inspect needs Python 3.11 or newer; '$python' is $("$python" -V 2>&1). Set PYTHON=..." >&2; exit 1; }
if [ "$service" = 1 ] && ! command -v systemctl >/dev/null; then
  echo "Error: --service needs systemd, and systemctl is not on this machine. Install without --service." >&2; exit 1
fi

"$python" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet "$here${extras:+[$extras]}"
if [ "$gpu" = 1 ]; then
  # onnxruntime-gpu replaces the CPU wheel: both provide the module
  # 'onnxruntime', and with both installed the last one wins at random.
  "$prefix/bin/pip" uninstall --quiet -y onnxruntime
  "$prefix/bin/pip" install --quiet "onnxruntime-gpu>=1.18"
fi
ln -sf "$prefix/bin/edge-inspect" /usr/local/bin/edge-inspect
echo "Installed: $("$prefix/bin/edge-inspect" --help >/dev/null && echo "$prefix/bin/edge-inspect (linked from /usr/local/bin)")"

if [ "$service" = 1 ]; then
  # A system user without a login; add the users (or the Samba account) that
  # drop parts into the hot folder to its group.
  id -u edge-inspect >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/edge-inspect \
    --no-create-home --shell /usr/sbin/nologin --comment "edge-inspect service" edge-inspect
  # setgid: files dropped in the hot folder belong to the group, so that the service can read them.
  install -d -o edge-inspect -g edge-inspect -m 2775 /srv/edge-inspect /srv/edge-inspect/incoming
  install -d -m 0755 /etc/edge-inspect
  if [ -e /etc/edge-inspect/edge-inspect.env ]; then
    echo "Kept the settings in /etc/edge-inspect/edge-inspect.env (the example is $here/deploy/edge-inspect.env)."
  else
    install -m 0644 "$here/deploy/edge-inspect.env" /etc/edge-inspect/edge-inspect.env
  fi
  render_unit > /etc/systemd/system/edge-inspect.service.new
  chmod 0644 /etc/systemd/system/edge-inspect.service.new
  mv /etc/systemd/system/edge-inspect.service.new /etc/systemd/system/edge-inspect.service
  if [ "$gpu" = 1 ]; then
    # CUDA needs /dev/nvidia*, which the unit's PrivateDevices=yes hides.
    install -d -m 0755 /etc/systemd/system/edge-inspect.service.d
    printf '[Service]\n# CUDA needs /dev/nvidia* (written by install.sh --gpu --service).\nPrivateDevices=no\n' \
      > /etc/systemd/system/edge-inspect.service.d/gpu.conf
  fi
  systemctl daemon-reload
  echo "Service installed. Set WATCH_DIR and MODEL_DIR in /etc/edge-inspect/edge-inspect.env, then:"
  echo "  sudo systemctl enable --now edge-inspect && journalctl -u edge-inspect -f"
fi
