#!/usr/bin/env bash
# Create .venv (once) and install edge-inspect with the extras given, e.g.
#   scripts/setup.sh train,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# setuptools' editable build warns about import shadowing in every checkout; a new user should see errors only
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet -e ".[${extras}]"
