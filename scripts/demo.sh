#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job end to end on
# synthetic parts: generate images, train a small model, report, export, and
# watch a hot folder fed the test parts like a camera.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh train,test
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/edge-inspect demo --out "${1:-demo}"
