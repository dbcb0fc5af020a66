#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Usage: bash scripts/test.sh [pytest args]
# The tests run in parallel, one pytest-xdist worker per core (at most 8; each test uses one torch thread):
# TEST_WORKERS=N sets the count, TEST_WORKERS=0 runs them in this process, one after another.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${TEST_WORKERS:-auto}
exec "${VENV:-.venv}/bin/python" -m pytest tests -q -n "$workers" --maxprocesses 8 "$@"
