#!/usr/bin/env bash
# Set up (if needed) and run the main job: a miniature of the paper's classification table on the built-in digits
# data (per seed, 3 by default: train a small ViT, then no reduction / ToMe / ATC single|complete|average at
# several keep rates, off the shelf and after a short fine-tune, with token counts and GFLOPs). Writes
# results/digits_table/results.{csv,md,png}; about 13 minutes on 2 idle CPU cores; rerunning resumes.
# Usage: bash scripts/main.sh [extra flags of reproduce_digits_table.py, e.g. --seeds 0 1 2 3 4]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenMP threads that spin-wait between parallel regions take the cores other work needs: on 2 busy cores that made
# training steps several times slower; waiting passively cost 0-15% on quiet cores (measured). OMP_WAIT_POLICY
# set by the caller wins.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "${VENV:-.venv}/bin/python" reproduce_digits_table.py --output_dir results/digits_table "$@"
