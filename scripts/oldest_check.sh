#!/usr/bin/env bash
# The oldest versions pyproject.toml admits, checked: Python, numpy and numba
# at their floors in a fresh virtual environment, fastqkv built and installed
# there, then `fastqkv check --quick` (every backend against the oracle).
# Raise a floor in pyproject.toml and here together.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=3.9
FLOORS=("numpy==1.23.0" "numba==0.59.0")

# that Python: $FASTQKV_OLDEST_PYTHON, python3.9 on the PATH, or pyenv's
PYTHON="${FASTQKV_OLDEST_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for cand in "python$OLDEST" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$OLDEST".*/bin/python"$OLDEST"; do
        if "$cand" -c "import sys" 2>/dev/null; then PYTHON="$cand"; break; fi
    done
fi
if [ -z "$PYTHON" ]; then
    echo "oldest-version check skipped: no Python $OLDEST (set FASTQKV_OLDEST_PYTHON)"
    exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
echo "python $(python -c 'import platform; print(platform.python_version())'), ${FLOORS[*]}"
python -m pip install --quiet --upgrade pip "setuptools>=64" wheel
python -m pip install --quiet "${FLOORS[@]}"
python -m pip install --quiet --no-build-isolation .
export NUMBA_CACHE_DIR="$WORK/numba-cache"
cd "$WORK"
python -I -c "import fastqkv, numpy, numba; print('fastqkv', fastqkv.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)"
python -I -m fastqkv info | sed -n '/^backends:/,$p'
python -I -m fastqkv check --quick
