#!/usr/bin/env bash
# One prepared command for a GPU machine: the clustering, ViT and Stable Diffusion benchmarks, then one summary.
#
#   bash scripts/gpu_benchmark.sh                          # on the GPU machine (about 5 minutes)
#   DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python bash scripts/gpu_benchmark.sh   # the same pipeline, tiny, on CPU
#
# Needs only the repository and a python with torch/timm (triton for the GPU backend): nothing is installed
# and nothing is downloaded. The repository runs from its root with PYTHONPATH=. (no install step). If
# `import diffusers` fails, the first diffusers-*.whl under $WHEELS is installed (--no-deps --no-index) into a
# temporary folder put on PYTHONPATH; without one the Stable Diffusion step is skipped and the summary says so.
#
# Steps, each under its own timeout and within a total time budget; a step that fails or times out is recorded
# in the summary and the next one runs:
#   (a) benchmark_atc_framework.py: T = 196, 576, 1024 at B = 1, 64, 256 and T = 4096 at B = 1, 2
#       (distances are B*T*T*8 bytes, twice), K = T/2, average linkage, frameworks triton/torch/numba (those
#       that atc.cluster.available_backends() lists here; the others are noted as skipped);
#   (b) benchmark_merging_method.py: deit/tome/atc small and base, keep 0.7 and 0.5, batch 1 and 256, fp16
#       autocast, average linkage; if its --help lists --compile, also --compile default at batch 256 and
#       --compile reduce-overhead at batch 1 (small models, keep 0.7);
#   (c) SD_setup/benchmark_diffusion.py: sd15 UNet, none/tome/atc at ratio 0.5 (per block and with a shared plan;
#       ATC also in 16x16 tiles), float16, clustering backend auto;
#   (d) scripts/triton_warps_sweep.py: the triton kernel at 1-16 warps per sample against its default
#       (T = 196, 576 at B = 1, 256; T = 4096 at B = 1), to tune atc._triton_cluster.launch_config.
#
# Writes to $OUT (at most 8 files, so that all of them come back from a device run): summary.md (GPU, versions,
# step status, key numbers next to the issue's targets, all tables), log.txt (every step's output),
# framework.csv, vit.csv, sd.csv, triton_warps.csv.
#
# Environment:
#   OUT=results/gpu_benchmark   where the files go (the default is inside the repository)
#   DEVICE=cuda                 torch device for every step
#   QUICK=0                     1: tiny sizes and models, a few runs (tests the pipeline on CPU in about a minute)
#   PYTHON=python3              interpreter that has torch/timm
#   WHEELS=wheels               folder searched for a diffusers wheel when diffusers is not importable
#                               (default: wheels/, else .whl/)
#   BUDGET_S=480 (QUICK: 240)   total seconds for all steps; later steps are shortened or skipped to fit
#   COMPILE=1 (QUICK: 0)        0: skip the --compile runs of (b)
#   STEPS="framework vit sd compile warps"   the steps to run (e.g. STEPS=sd to redo only the Stable Diffusion step)
#   KEEP_WORK=0                 1: keep the working folder with each step's own outputs (plots, raw CSVs)
set -uo pipefail
# OUT and WHEELS given relative are taken from the caller's folder; the defaults are inside the repository.
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ -z "${OUT:-}" ] || OUT=$(absolute "$OUT")
[ -z "${WHEELS:-}" ] || WHEELS=$(absolute "$WHEELS")
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu_benchmark}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python3}
if [ "$QUICK" = 1 ]; then
    BUDGET_S=${BUDGET_S:-240}; COMPILE=${COMPILE:-0}
else
    BUDGET_S=${BUDGET_S:-480}; COMPILE=${COMPILE:-1}
fi
STEPS=" ${STEPS:-framework vit sd compile warps} "
if [ -z "${WHEELS:-}" ]; then WHEELS=wheels; [ -d "$WHEELS" ] || [ ! -d .whl ] || WHEELS=.whl; fi

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}  # fewer progress-bar lines in log.txt

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/summary.md" "$OUT/log.txt" "$OUT/framework.csv" "$OUT/vit.csv" "$OUT/sd.csv" "$OUT/triton_warps.csv"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/atc_gpu_benchmark.XXXXXX")
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/log.txt"
STATUS="$WORK/status.tsv"
: >"$STATUS"
: >"$LOG"
T0=$(date +%s)
RESERVE_S=20   # kept back from the budget for the summary
MIN_STEP_S=15  # a step with less time left than this is skipped

say() { echo "[gpu_benchmark] $*" | tee -a "$LOG"; }
# record STEP STATUS SECONDS NOTE: one line of the summary's step table
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-300)" >>"$STATUS"; }

# wanted STEP LABEL: whether STEP is in $STEPS (else records LABEL as skipped)
wanted() {
    [[ "$STEPS" == *" $1 "* ]] && return 0
    record "$2" skipped 0 "not in STEPS=\"${STEPS:1:-1}\""
    return 1
}

# run_step NAME TIMEOUT_S COMMAND...: run under a timeout cut to the time left; log its output; record the result
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - T0) - RESERVE_S))
    if ((left < MIN_STEP_S)); then
        record "$name" skipped 0 "time budget (BUDGET_S=$BUDGET_S s) spent before this step"
        say "$name: skipped (time budget spent)"
        return 1
    fi
    ((limit > left)) && limit=$left
    say "$name: $* (timeout ${limit}s)"
    local start rc secs
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/step.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - start))
    if ((rc == 0)); then
        record "$name" ok "$secs" ""
    elif ((rc == 124 || rc == 137)); then
        record "$name" timeout "$secs" "killed after ${limit}s; results of this step may be missing or partial"
    else
        record "$name" "failed (rc=$rc)" "$secs" \
            "$(grep -E 'Error|error|ERROR|Traceback' "$WORK/step.log" | tail -n 1)"
    fi
    say "$name: rc=$rc after ${secs}s"
    return "$rc"
}

# ---------------------------------------------------------------- sizes
if [ "$QUICK" = 1 ]; then
    FW_TOKENS="16 36"; FW_BATCHES="1 4"; FW_LARGE_TOKENS=64; FW_LARGE_BATCHES="1 2"
    FW_ARGS=(--runs 3 --repeats 1 --max_seconds 1 --emb_size 16)
    CLUSTER_KEYS="16:4,36:4,64:2"
    VIT_SIZES="tiny"; VIT_SMALL=tiny; VIT_BASE=tiny; VIT_BATCH_EXPS="0 1"; VIT_KEY_BATCH=2
    VIT_ARGS=(--input_size 64 --runs 3 --repeats 1)
    SD_ARGS=(--config unet-tiny --latent_size 8 --runs 1 --warmup 0 --steps 2 --tile none 4x4)
    T_FW=90; T_FW_LARGE=60; T_VIT=90; T_SD=120; T_COMPILE=120; T_WARPS=60
    WARPS_ARGS=(--tokens 16 40 --batches 1 2 --warps 1 2 --runs 1)
else
    FW_TOKENS="196 576 1024"; FW_BATCHES="1 64 256"; FW_LARGE_TOKENS=4096; FW_LARGE_BATCHES="1 2"
    FW_ARGS=(--runs 50 --repeats 2 --max_seconds 2 --emb_size 64)
    CLUSTER_KEYS="196:256,576:256,4096:2"
    VIT_SIZES="small base"; VIT_SMALL=small; VIT_BASE=base; VIT_BATCH_EXPS="0 8"; VIT_KEY_BATCH=256
    VIT_ARGS=(--runs 50 --repeats 2)
    SD_ARGS=(--config sd15 --latent_size 64 --runs 5 --warmup 2 --steps 3 --tile none 16x16)
    T_FW=150; T_FW_LARGE=60; T_VIT=120; T_SD=180; T_COMPILE=150; T_WARPS=60
    WARPS_ARGS=(--tokens 196 576 4096 --batches 1 256 --warps 1 2 4 8 16 --runs 20)
fi

say "device=$DEVICE quick=$QUICK budget=${BUDGET_S}s python=$PYTHON out=$OUT"

# ---------------------------------------------------------------- preflight
# Checks the device, and writes the frameworks of step (a) that are available here (and those that are not).
if ! "$PYTHON" - "$DEVICE" "$WORK/frameworks.txt" >>"$LOG" 2>&1 <<'EOF'; then
import sys

import torch

device = torch.device(sys.argv[1])
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, GPU: {gpu}")
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit(f"DEVICE={sys.argv[1]} but CUDA is not available to this torch")
from atc.cluster import available_backends  # the repository is importable from its root

have = available_backends()
print(f"clustering backends available: {have}")
wanted = ["triton", "torch", "numba"]
with open(sys.argv[2], "w") as f:
    print(",".join(w for w in wanted if w in have) or "-", ",".join(w for w in wanted if w not in have) or "-", file=f)
EOF
    record preflight "failed" 0 "$(tail -n 1 "$LOG")"
    say "preflight failed: $(tail -n 1 "$LOG")"
    PREFLIGHT_FAILED=1
else
    record preflight ok 0 ""
    PREFLIGHT_FAILED=0
fi

if [ "$PREFLIGHT_FAILED" = 0 ] && wanted framework "framework benchmark"; then
    # ------------------------------------------------------------ (a) clustering step
    read -r FRAMEWORKS MISSING <"$WORK/frameworks.txt"
    FRAMEWORKS=${FRAMEWORKS:--}
    if [ "${MISSING:--}" != - ]; then
        record "framework benchmark" note 0 "frameworks skipped, not in available_backends() here: ${MISSING//,/, }$( \
            [ "$DEVICE" = cpu ] && echo ' (triton runs on CPU only under TRITON_INTERPRET=1)')"
    fi
    if [ "$FRAMEWORKS" = - ]; then
        record "framework benchmark" skipped 0 "none of triton, torch, numba is available"
    else
        # shellcheck disable=SC2086  # word splitting of the size lists is intended
        run_step "framework benchmark (T=${FW_TOKENS// /,}; B=${FW_BATCHES// /,})" "$T_FW" \
            "$PYTHON" benchmark_atc_framework.py --device "$DEVICE" --framework ${FRAMEWORKS//,/ } \
            --tokens $FW_TOKENS --batches $FW_BATCHES --reduction_ratio 0.5 --linkage average "${FW_ARGS[@]}" \
            --output_dir "$WORK/framework_main"
        # shellcheck disable=SC2086
        run_step "framework benchmark (T=$FW_LARGE_TOKENS; B=${FW_LARGE_BATCHES// /,})" "$T_FW_LARGE" \
            "$PYTHON" benchmark_atc_framework.py --device "$DEVICE" --framework ${FRAMEWORKS//,/ } \
            --tokens $FW_LARGE_TOKENS --batches $FW_LARGE_BATCHES --reduction_ratio 0.5 --linkage average \
            "${FW_ARGS[@]}" --output_dir "$WORK/framework_large"
    fi
fi

if [ "$PREFLIGHT_FAILED" = 0 ] && wanted vit "vit"; then
    # ------------------------------------------------------------ (b) ViT throughput
    for size in $VIT_SIZES; do
        # shellcheck disable=SC2086
        run_step "vit $size (keep 0.7, 0.5)" "$T_VIT" \
            "$PYTHON" benchmark_merging_method.py --device "$DEVICE" --use_amp --linkage average \
            --model "tome_${size}_patch16_224" "atc_${size}_patch16_224" --reduction_ratio 0.7 0.5 \
            --batch_sizes $VIT_BATCH_EXPS "${VIT_ARGS[@]}" --output_dir "$WORK/vit_$size"
    done
fi

if [ "$PREFLIGHT_FAILED" = 0 ] && wanted sd "sd unet step"; then
    # ------------------------------------------------------------ (c) Stable Diffusion UNet step
    SD_OK=1
    if ! "$PYTHON" -c "import diffusers" >/dev/null 2>&1; then
        SD_OK=0
        wheel=$(ls "$WHEELS"/diffusers-*.whl 2>/dev/null | head -n 1)
        if [ -n "$wheel" ]; then
            if "$PYTHON" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check \
                --target "$WORK/site" "$wheel" >>"$LOG" 2>&1; then
                export PYTHONPATH="$PYTHONPATH:$WORK/site"
                if err=$("$PYTHON" -c "import diffusers" 2>&1); then
                    SD_OK=1
                    record "diffusers" note 0 "installed from $wheel into a temporary folder"
                else
                    record "sd unet step" skipped 0 "diffusers from $wheel does not import: $(echo "$err" | tail -n 1)"
                fi
            else
                record "sd unet step" skipped 0 "pip could not install $wheel (see log.txt)"
            fi
        else
            record "sd unet step" skipped 0 "diffusers is not importable and no diffusers-*.whl in $WHEELS/"
        fi
    fi
    if [ "$SD_OK" = 1 ]; then
        run_step "sd unet step" "$T_SD" \
            "$PYTHON" SD_setup/benchmark_diffusion.py --device "$DEVICE" --dtype float16 --methods none tome atc \
            --ratios 0.5 --plan block group --backend auto "${SD_ARGS[@]}" --output_dir "$WORK/sd"
    fi
fi

if [ "$PREFLIGHT_FAILED" = 0 ] && wanted compile "vit compile"; then
    # ------------------------------------------------------------ (b') torch.compile, once the flag exists
    if [ "$COMPILE" != 1 ]; then
        record "vit compile" skipped 0 "COMPILE=$COMPILE"
    elif [[ "$("$PYTHON" benchmark_merging_method.py --help 2>/dev/null)" != *"--compile"* ]]; then
        record "vit compile" skipped 0 "benchmark_merging_method.py has no --compile flag in this tree"
    else
        set -- default "${VIT_BATCH_EXPS##* }" reduce-overhead "${VIT_BATCH_EXPS%% *}"
        while (($# >= 2)); do
            mode=$1 exp=$2
            shift 2
            run_step "vit $VIT_SMALL compile $mode (batch $((2 ** exp)))" "$T_COMPILE" \
                "$PYTHON" benchmark_merging_method.py --device "$DEVICE" --use_amp --linkage average \
                --model "tome_${VIT_SMALL}_patch16_224" "atc_${VIT_SMALL}_patch16_224" --reduction_ratio 0.7 \
                --batch_sizes "$exp" --no_r0_check --compile "$mode" "${VIT_ARGS[@]}" \
                --output_dir "$WORK/vit_${VIT_SMALL}_compile_$mode"
        done
    fi
fi

if [ "$PREFLIGHT_FAILED" = 0 ] && wanted warps "triton warps sweep"; then
    # ------------------------------------------------------------ (d) warps per sample of the triton kernel
    read -r FRAMEWORKS MISSING <"$WORK/frameworks.txt"
    if [[ ",$FRAMEWORKS," != *",triton,"* ]]; then
        record "triton warps sweep" skipped 0 "the triton backend is not available here"
    else
        run_step "triton warps sweep" "$T_WARPS" \
            "$PYTHON" scripts/triton_warps_sweep.py --device "$DEVICE" "${WARPS_ARGS[@]}" \
            --output "$OUT/triton_warps.csv"
    fi
fi

# ---------------------------------------------------------------- summary
quick_flag=()
[ "$QUICK" = 1 ] && quick_flag=(--quick)
say "summary"
if ! timeout 120 "$PYTHON" scripts/gpu_benchmark_summary.py --work "$WORK" --out "$OUT" --device "$DEVICE" \
    --cluster_settings "$CLUSTER_KEYS" --vit_small "$VIT_SMALL" --vit_base "$VIT_BASE" \
    --vit_batch "$VIT_KEY_BATCH" --elapsed "$(($(date +%s) - T0))" ${quick_flag[@]+"${quick_flag[@]}"} \
    >>"$LOG" 2>&1; then
    # The summary script itself failed: keep the raw step table and the CSVs, at most 8 files in all.
    {
        echo "# GPU benchmark: summary script failed (see log.txt)"
        echo
        echo "| step | status | seconds | note |"
        echo "|---|---|---|---|"
        sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$STATUS"
    } >"$OUT/summary.md"
    for f in "$WORK"/framework_main/*.csv "$WORK"/vit_"$VIT_SMALL"/*.csv "$WORK"/sd/*.csv; do
        [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")").csv"
    done
fi
say "done in $(($(date +%s) - T0))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$OUT/summary.md"
# Exit status: 0 when every step ran (skips and notes are not failures).
! grep -qE $'^[^\t]*\t(failed|timeout)' "$STATUS"
