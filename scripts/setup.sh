#!/usr/bin/env bash
# Create ./.venv and install the atc package with everything the scripts and tests use. Idempotent: a second
# run with unchanged requirement files returns at once. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "atc needs Python >= 3.10; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.10+" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.atc-installed"
want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import atc' 2>/dev/null; then
    echo "setup: $VENV is up to date"
    exit 0
fi
echo "setup: installing into $VENV (first run takes a few minutes)"
# The constraints pin the torch/torchvision pair known to work on CPU machines; the CUDA build of the same
# versions works on GPU machines.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    -c requirements/constraints.txt -r requirements/dev.txt
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e .
echo "$want" > "$stamp"
"$VENV/bin/python" -c 'import atc, torch, timm; print(f"setup: atc {atc.__version__}, torch {torch.__version__}, timm {timm.__version__}, clustering backends: {atc.available_backends()}")'
