#!/usr/bin/env python
"""Throughput of token-reduced ViTs vs the unreduced model, measured in one run.

    python benchmark_merging_method.py --model atc_small_patch16_224 tome_small_patch16_224 \
        --reduction_ratio 0.7 --batch_sizes 4 --runs 40 --output_dir output/bench

Randomly initialised models and random input (REFERENCE §3). Besides the requested models the run measures the
unreduced baseline (``--baseline``, default ``deit_<size>_patch16_224``) and the baseline patched with r = 0 (the
cost of being patched), interleaved over ``--repeats`` rounds so machine load affects all alike; the best round
counts. Writes ``throughput.csv`` (batch_size, throughput, reduction_ratio, model, input_size, speedup) and
``throughput.png``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["atc_small_patch16_224"],
                   help="registered token-reduction model(s), e.g. atc_small_patch16_224 tome_small_patch16_224")
    p.add_argument("--baseline", default=None,
                   help="unreduced timm model measured in the same run (default: deit_<size>_patch16_224)")
    p.add_argument("--reduction_ratio", "--keep_rate", dest="reduction_ratio", type=float, nargs="+", default=[0.7],
                   help="keep rate(s) in (0, 1] at each reduction location (several values are swept)")
    p.add_argument("--reduction_loc", type=int, nargs="+", default=[3, 6, 9], help="0-indexed reduction blocks")
    p.add_argument("--linkage", default="complete", choices=["single", "complete", "average"], help="ATC linkage")
    p.add_argument("--no_proportional_attn", action="store_true", help="disable proportional attention")
    p.add_argument("--input_size", type=int, default=224, help="square input side in pixels")
    p.add_argument("--runs", type=int, default=2000, help="forward passes per measurement (incl. warm-up)")
    p.add_argument("--throw_out", type=float, default=0.25, help="fraction of runs discarded as warm-up")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4],
                   help="exponents of 2: 4 means batch 16 (as in the published benchmark)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds per model; the best round counts")
    p.add_argument("--no_r0_check", action="store_true",
                   help="skip measuring the baseline patched with r=0 (cost of the patch itself)")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import timm

    import atc.models  # noqa: F401  (registers the models with timm)
    import atc.patch
    from atc.benchmark import measure_throughput
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
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    torch.manual_seed(0)
    entries: list[tuple[str, float | None, torch.nn.Module]] = []
    base = timm.create_model(baseline, pretrained=False, img_size=args.input_size).to(device).eval()
    entries.append((baseline, None, base))
    if not args.no_r0_check:
        patched = timm.create_model(baseline, pretrained=False, img_size=args.input_size).to(device).eval()
        patched.load_state_dict(base.state_dict())
        atc.patch.timm(patched, method="atc", linkage=args.linkage)
        patched.r = 0
        entries.append((f"{baseline}+patch(r=0)", None, patched))
    for name in args.model:
        for kr in args.reduction_ratio:
            model = timm.create_model(
                name, pretrained=False, img_size=args.input_size, reduction_loc=args.reduction_loc, keep_rate=kr,
                linkage=args.linkage, proportional_attn=not args.no_proportional_attn,
            ).to(device).eval()
            entries.append((name, kr, model))

    best: dict[tuple[int, int], float] = {}
    total = len(args.batch_sizes) * args.repeats * len(entries) * args.runs
    with tqdm(total=total, desc="benchmark", unit="fwd") as bar:
        for exp in args.batch_sizes:
            bsz = 2**exp
            x = torch.randn(bsz, 3, args.input_size, args.input_size, device=device)
            for _ in range(args.repeats):
                for i, (_name, _kr, model) in enumerate(entries):

                    def step(model: torch.nn.Module = model) -> None:
                        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.use_amp):
                            model(x)

                    tp = measure_throughput(step, bsz, args.runs, args.throw_out, device, progress=bar.update)
                    best[(exp, i)] = max(best.get((exp, i), 0.0), tp)

    rows = []
    for exp in args.batch_sizes:
        ref = best[(exp, 0)]
        for i, (name, kr, _m) in enumerate(entries):
            rows.append({
                "batch_size": 2**exp, "throughput": round(best[(exp, i)], 2),
                "reduction_ratio": "" if kr is None else kr, "model": name, "input_size": args.input_size,
                "speedup": round(best[(exp, i)] / ref, 3),
            })
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "throughput.csv")
    line_plot(rows, "batch_size", "throughput", ["model", "reduction_ratio"], out / "throughput.png",
              title=f"throughput at {args.input_size}px ({args.device})", xlabel="batch size", ylabel="images / s")
    width = max(len(r["model"]) for r in rows) + 2
    print(f"{'model':<{width}} {'keep':>5} {'batch':>5} {'img/s':>9} {'vs ' + baseline:>8}")
    for r in rows:
        print(f"{r['model']:<{width}} {str(r['reduction_ratio']):>5} {r['batch_size']:>5} {r['throughput']:>9.2f} "
              f"{r['speedup']:>7.3f}x")
    for exp in args.batch_sizes:
        by = {(r["model"], r["reduction_ratio"]): r["throughput"] for r in rows if r["batch_size"] == 2**exp}
        for kr in args.reduction_ratio:
            atc_names = [n for n in args.model if n.startswith("atc_")]
            tome_names = [n for n in args.model if n.startswith("tome_")]
            for a in atc_names:
                for t in tome_names:
                    print(f"batch {2**exp}, keep {kr}: {a} / {t} = {by[(a, kr)] / by[(t, kr)]:.3f}x")
    print(f"wrote {out / 'throughput.csv'} and {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
