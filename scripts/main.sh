#!/usr/bin/env bash
# Set up (if needed) and run the main job: the clustering framework benchmark on its default settings.
# Results (CSV, plot) go to results/atc_framework/. Usage: bash scripts/main.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" benchmark_atc_framework.py --output_dir results/atc_framework "$@"
