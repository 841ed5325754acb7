#!/usr/bin/env bash
# Install edge-inspect on a line PC into its own virtual environment.
#
#   sudo deploy/install.sh            # lean runtime (CPU), from this checkout
#   sudo deploy/install.sh --gpu      # runtime with the CUDA execution provider
#   sudo deploy/install.sh --train    # also the training side (TensorFlow)
#
# Environment: PREFIX (default /opt/edge-inspect), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${PREFIX:-/opt/edge-inspect}"
python="${PYTHON:-python3}"
extras=""
gpu=0
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    --train) extras="${extras:+$extras,}train" ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "Error: unknown option '$arg'. Use --gpu and/or --train." >&2; exit 2 ;;
  esac
done

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Error: edge-inspect needs Python 3.11 or newer; '$python' is $("$python" -V 2>&1). Set PYTHON=..." >&2; exit 1; }

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
