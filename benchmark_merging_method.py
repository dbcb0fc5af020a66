#!/usr/bin/env python
r"""Throughput, latency, FLOPs and memory of token-reduced ViTs vs the unreduced model, measured in one run.

    python benchmark_merging_method.py --model atc_small_patch16_224 tome_small_patch16_224 \
        --reduction_ratio 0.7 --batch_sizes 4 --runs 40 --output_dir output/bench
    python benchmark_merging_method.py --model tome_small_patch16_224 --compile reduce-overhead --device cuda

Randomly initialised models and random input: speed and memory do not depend on the weights or the
images, so nothing needs to be downloaded. Besides the requested models the run measures the
unreduced baseline (``--baseline``, default ``deit_<size>_patch16_224``) and the baseline patched with r = 0 (the
cost of being patched), interleaved over ``--repeats`` rounds so machine load affects all alike; the best round
counts. With ``--compile`` every model, the baseline included, is compiled the same way. Writes
``throughput.csv`` (batch_size, throughput, reduction_ratio, model, input_size, speedup, gflops, tokens,
final_tokens, latency_ms, peak_memory_mib, compile) and ``throughput.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from atc.benchmark import COMPILE_MODES
from atc.cluster import LINKAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["atc_small_patch16_224"],
                   help="registered token-reduction model(s), e.g. atc_small_patch16_224 tome_small_patch16_224")
    p.add_argument("--baseline", default=None,
                   help="unreduced timm model measured in the same run (default: deit_<size>_patch16_224)")
    p.add_argument("--reduction_ratio", "--keep_rate", dest="reduction_ratio", type=float, nargs="+", default=[0.7],
                   help="keep rate(s) in (0, 1] at each reduction location (several values are swept)")
    p.add_argument("--reduction_loc", type=int, nargs="+", default=[3, 6, 9], help="0-indexed reduction blocks")
    p.add_argument("--linkage", default="complete", choices=sorted(LINKAGES), help="ATC linkage")
    p.add_argument("--no_proportional_attn", action="store_true", help="disable proportional attention")
    p.add_argument("--input_size", type=int, default=224, help="square input side in pixels (a multiple of 16)")
    p.add_argument("--runs", type=int, default=2000,
                   help="forward passes per measurement (incl. warm-up); also used for the batch-1 latency")
    p.add_argument("--throw_out", type=float, default=0.25, help="fraction of runs discarded as warm-up")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4],
                   help="exponents of 2: 4 means batch 16 (as in the published benchmark)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds per model; the best round counts")
    p.add_argument("--no_r0_check", action="store_true",
                   help="skip measuring the baseline patched with r=0 (cost of the patch itself)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile every model, the baseline included: 'none' runs eagerly, the others are "
                        "torch.compile modes ('reduce-overhead' adds CUDA graphs on a GPU); compiling happens "
                        "in untimed warm-up calls, one graph per batch size")
    p.add_argument("--fullgraph", action="store_true",
                   help="with --compile: compile with fullgraph=True, so any graph break is an error")
    p.add_argument("--use_amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output_dir", default="output/benchmark_merging_method", help="folder for CSV and PNG")
    args = p.parse_args(argv)
    for kr in args.reduction_ratio:
        if not 0 < kr <= 1:
            p.error(f"--reduction_ratio {kr} is not a keep rate in (0, 1] (e.g. 0.7 keeps 70% per location)")
    if args.runs < 1 or not 0 <= args.throw_out < 1:
        p.error("--runs must be >= 1 and --throw_out in [0, 1)")
    if any(e < 0 or e > 12 for e in args.batch_sizes):
        p.error("--batch_sizes are exponents of 2 between 0 and 12 (4 -> batch 16)")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.input_size < 16 or args.input_size % 16:
        p.error(f"--input_size {args.input_size} must be a positive multiple of the patch size 16 (e.g. 224)")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.fullgraph and args.compile == "none":
        p.error("--fullgraph needs --compile default|reduce-overhead|max-autotune")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r} is not a torch device ({exc}); use e.g. cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here (use --device cpu)")
    return args


def _measure(
    args: argparse.Namespace, runners: list, models: list[torch.nn.Module], shapes: list[int], device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """Best throughput and peak memory (MiB, NaN off CUDA) of every runner at every batch size, keyed by
    ``(batch size, runner index)``; the runners take turns in ``--repeats`` rounds."""
    from atc.benchmark import measure_throughput, peak_memory_mib

    warm_calls = 1 if args.compile == "none" else 3  # compile, then CUDA-graph warm-up and recording
    best: dict[tuple[int, int], float] = {}
    memory: dict[tuple[int, int], float] = {}
    total = len(shapes) * args.repeats * len(runners) * args.runs + len(shapes) * len(runners) * warm_calls
    with tqdm(total=total, desc="benchmark", unit="fwd") as bar:
        for bsz in shapes:
            x = torch.randn(bsz, 3, args.input_size, args.input_size, device=device)
            for round_ in range(args.repeats):
                for i, runner in enumerate(runners):

                    def step(runner: object = runner) -> None:
                        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.use_amp):
                            runner(x)

                    if round_ == 0:
                        for _ in range(warm_calls):
                            step()
                            bar.update(1)
                    tp = measure_throughput(step, bsz, args.runs, args.throw_out, device, progress=bar.update)
                    key = (bsz, i)
                    best[key] = max(best.get(key, 0.0), tp)
                    mem = peak_memory_mib(step, device, models[i])
                    memory[key] = max(memory.get(key, mem), mem)
    return best, memory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import timm

    import atc.models  # noqa: F401  (registers the models with timm)
    import atc.patch
    from atc.benchmark import compile_model, count_flops, tokens_per_block
    from atc.utils import line_plot, write_csv

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.model:
        if name not in atc.models.MODEL_NAMES:
            sys.exit(f"error: unknown --model {name!r}; registered: {', '.join(atc.models.MODEL_NAMES)}")
    baseline = args.baseline
    if baseline is None:
        size = re.search(r"_(tiny|small|base)_", args.model[0])
        baseline = f"deit_{size.group(1) if size else 'small'}_patch16_224"
    if not timm.is_model(baseline):
        sys.exit(f"error: unknown --baseline {baseline!r}: give a timm model name such as deit_small_patch16_224")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    batches = [2**e for e in args.batch_sizes]

    torch.manual_seed(0)
    models: list[tuple[str, float | None, torch.nn.Module]] = []
    base = timm.create_model(baseline, pretrained=False, img_size=args.input_size).to(device).eval()
    models.append((baseline, None, base))
    if not args.no_r0_check:
        patched = timm.create_model(baseline, pretrained=False, img_size=args.input_size).to(device).eval()
        patched.load_state_dict(base.state_dict())
        atc.patch.timm(patched, method="atc", linkage=args.linkage)
        patched.r = 0
        models.append((f"{baseline}+patch(r=0)", None, patched))
    for name in args.model:
        for kr in args.reduction_ratio:
            try:
                model = timm.create_model(
                    name, pretrained=False, img_size=args.input_size, reduction_loc=args.reduction_loc,
                    keep_rate=kr, linkage=args.linkage, proportional_attn=not args.no_proportional_attn,
                )
            except ValueError as exc:  # e.g. a --reduction_loc outside the model's blocks
                sys.exit(f"error: cannot build {name} with --reduction_loc {args.reduction_loc} and keep rate {kr}: "
                         f"{exc}")
            models.append((name, kr, model.to(device).eval()))

    # FLOPs and token counts of one image, from an eager forward of each model (the counts it really reaches)
    image = torch.randn(1, 3, args.input_size, args.input_size, device=device)
    flops, tokens = [], []
    for _name, _kr, model in models:
        flops.append(count_flops(model, image))
        tokens.append(tokens_per_block(model))

    latency_batch = 1
    shapes = sorted(set(batches) | {latency_batch})
    with contextlib.ExitStack() as stack:
        if args.compile != "none":
            import torch._dynamo as dynamo

            # one graph per input shape (the batch sizes and batch 1): stay within dynamo's recompile limit
            stack.enter_context(dynamo.config.patch(recompile_limit=max(dynamo.config.recompile_limit,
                                                                        len(shapes) + 2)))
        runners = [compile_model(model, args.compile, args.fullgraph) for _n, _k, model in models]
        best, memory = _measure(args, runners, [m for _n, _k, m in models], shapes, device, dtype)

    rows = []
    for bsz in batches:
        ref = best[(bsz, 0)]
        for i, (name, kr, _m) in enumerate(models):
            mem = memory[(bsz, i)]
            rows.append({
                "batch_size": bsz, "throughput": round(best[(bsz, i)], 2),
                "reduction_ratio": "" if kr is None else kr, "model": name, "input_size": args.input_size,
                "speedup": round(best[(bsz, i)] / ref, 3),
                "gflops": round(flops[i] / 1e9, 4),
                "tokens": "-".join(str(t) for t in tokens[i]),
                "final_tokens": tokens[i][-1],
                "latency_ms": round(1000.0 / best[(latency_batch, i)], 4),
                "peak_memory_mib": "" if math.isnan(mem) else round(mem, 1),
                "compile": args.compile,
            })
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "throughput.csv")
    line_plot(rows, "batch_size", "throughput", ["model", "reduction_ratio"], out / "throughput.png",
              title=f"throughput at {args.input_size}px ({args.device}, compile: {args.compile})",
              xlabel="batch size", ylabel="images / s")
    width = max(len(r["model"]) for r in rows) + 2
    print(f"{'model':<{width}} {'keep':>5} {'batch':>5} {'img/s':>9} {'vs base':>8} {'GFLOPs':>7} "
          f"{'tokens':>6} {'B=1 ms':>8} {'peak MiB':>9}")
    for r in rows:
        mem = "-" if r["peak_memory_mib"] == "" else f"{r['peak_memory_mib']:.1f}"
        print(f"{r['model']:<{width}} {str(r['reduction_ratio']):>5} {r['batch_size']:>5} {r['throughput']:>9.2f} "
              f"{r['speedup']:>7.3f}x {r['gflops']:>7.3f} {r['final_tokens']:>6} {r['latency_ms']:>8.3f} {mem:>9}")
    print(f"baseline: {baseline}; tokens: count after the last block (per block in the CSV); compile: {args.compile}")
    for bsz in batches:
        by = {(r["model"], r["reduction_ratio"]): r["throughput"] for r in rows if r["batch_size"] == bsz}
        for kr in args.reduction_ratio:
            atc_names = [n for n in args.model if n.startswith("atc_")]
            tome_names = [n for n in args.model if n.startswith("tome_")]
            for a in atc_names:
                for t in tome_names:
                    print(f"batch {bsz}, keep {kr}: {a} / {t} = {by[(a, kr)] / by[(t, kr)]:.3f}x")
    print(f"wrote {out / 'throughput.csv'} and {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
