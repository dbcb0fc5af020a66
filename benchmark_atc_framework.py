#!/usr/bin/env python
"""Benchmark the agglomerative-clustering step of ATC across backends (the paper's framework benchmark).

Times exactly what ATC does per reduction step: normalise the metric, cosine distances, cluster every sample
into K = int(n * reduction_ratio) clusters, labels back on the metric's device. Every backend's labels are
checked against scikit-learn's (the published reference) on the same inputs. Backends are timed in
``--repeats`` interleaved rounds (best round counts), so the ratios are fair on a shared machine. Writes a CSV and a PNG plot
(throughput vs batch size, one line per backend) to --output_dir.

Example (the published command, plus our backends):
    python benchmark_atc_framework.py --output_dir results/framework --framework all \
        --input_sizes 224 384 512 --emb_size 64 --runs 20 --batch_sizes 0 2 4 6 --reduction_ratio 0.5
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from atc.benchmark import measure_throughput
from atc.cluster import BACKENDS, LINKAGES, agglomerative_clustering, available_backends
from atc.utils import line_plot, write_csv

# The published script's framework names, mapped to our backends.
ALIASES = {"rapids": "cuml"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--framework", nargs="+", default=["all"],
                   help="backends to time: any of %s, 'rapids' (= cuml), 'auto', or 'all' (every backend "
                        "available here)" % ", ".join(BACKENDS))
    p.add_argument("--input_sizes", nargs="+", type=int, default=[224],
                   help="image sizes; the token count is n = (size / patch_size)^2")
    p.add_argument("--patch_size", type=int, default=16, help="ViT patch size used to turn input sizes into n")
    p.add_argument("--emb_size", type=int, default=64, help="channels C of the clustering metric")
    p.add_argument("--runs", type=int, default=20, help="timed iterations per setting (including warm-up)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over all frameworks per setting, interleaved so that machine load affects all "
                        "alike; each framework's best round counts")
    p.add_argument("--throw_out", type=float, default=0.25,
                   help="fraction of the runs at the start used as warm-up and not timed")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[0, 2, 4, 6],
                   help="batch sizes as exponents of 2 (6 -> 64 samples), as in the published script")
    p.add_argument("--reduction_ratio", type=float, default=0.5,
                   help="clusters kept as a fraction of the tokens: K = int(n * reduction_ratio)")
    p.add_argument("--linkage", nargs="+", default=["average"], choices=sorted(LINKAGES),
                   help="linkage function(s)")
    p.add_argument("--use_amp", action="store_true",
                   help="feed the metric in reduced precision (float16 on CUDA, bfloat16 on CPU), as under AMP")
    p.add_argument("--device", default="cpu", help="device the metric lives on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the metric")
    p.add_argument("--max_seconds", type=float, default=60.0,
                   help="skip the remaining runs of one setting after this many seconds (0: no limit), so "
                        "slow backends at large batch sizes do not stall the whole benchmark")
    p.add_argument("--no_check", action="store_true", help="skip checking labels against scikit-learn")
    p.add_argument("--output_dir", default="results/atc_framework", help="folder for the CSV and plot")
    args = p.parse_args(argv)

    if not 0.0 < args.reduction_ratio <= 1.0:
        p.error(f"--reduction_ratio must be in (0, 1] (fraction of tokens kept as clusters), got {args.reduction_ratio}")
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if not 0.0 <= args.throw_out < 1.0:
        p.error(f"--throw_out must be in [0, 1), got {args.throw_out}")
    if any(b < 0 or b > 16 for b in args.batch_sizes):
        p.error(f"--batch_sizes are exponents of 2 between 0 and 16, got {args.batch_sizes}")
    if any(s < args.patch_size or s % args.patch_size for s in args.input_sizes):
        p.error(f"--input_sizes must be positive multiples of --patch_size {args.patch_size}, got {args.input_sizes}")
    if args.emb_size < 1:
        p.error(f"--emb_size must be positive, got {args.emb_size}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available here: use --device cpu")

    frameworks: list[str] = []
    for name in args.framework:
        name = ALIASES.get(name, name)
        if name == "all":
            frameworks += [b for b in available_backends() if b not in frameworks]
        elif name == "auto" or name in BACKENDS:
            if name not in available_backends() + ["auto"]:
                p.error(f"--framework {name} is not available here (available: {', '.join(available_backends())})")
            if name not in frameworks:
                frameworks.append(name)
        else:
            p.error(f"unknown --framework {name!r}: choose from all, auto, rapids, {', '.join(BACKENDS)}")
    args.frameworks = frameworks
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32
    if args.use_amp:
        dtype = torch.float16 if args.device.type == "cuda" else torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed)

    settings = [
        (linkage, size, 2**exp)
        for linkage in args.linkage
        for size in args.input_sizes
        for exp in args.batch_sizes
    ]
    rows: list[dict] = []
    bar = tqdm(total=len(settings) * len(args.frameworks) * args.runs * args.repeats, desc="clustering", unit="run")
    for linkage, size, batch in settings:
        n = (size // args.patch_size) ** 2
        k = max(1, int(n * args.reduction_ratio))
        metric = torch.randn(batch, n, args.emb_size, generator=gen).to(device=args.device, dtype=dtype)
        reference = None
        if not args.no_check:
            reference = agglomerative_clustering(metric, k, linkage, backend="sklearn")
        setting_rows = {}
        frameworks = []
        for framework in args.frameworks:
            if framework == "cuml" and linkage != "single":
                bar.update(args.runs * args.repeats)
                tqdm.write(f"skipping cuml for {linkage} linkage: RAPIDS supports single linkage only")
                continue
            labels = agglomerative_clustering(metric, k, linkage, framework)  # also warms up JIT/caches
            agreement = float("nan")
            if reference is not None:
                agreement = (labels.cpu() == reference.cpu()).all(dim=1).float().mean().item()
            runs = args.runs
            if args.max_seconds > 0:
                start = time.perf_counter()
                agglomerative_clustering(metric, k, linkage, framework)
                per_run = time.perf_counter() - start
                runs = max(1, min(args.runs, int(args.max_seconds / args.repeats / max(per_run, 1e-9))))
            frameworks.append((framework, runs))
            setting_rows[framework] = {
                "framework": framework,
                "linkage": linkage,
                "input_size": size,
                "n_patches": n,
                "emb_size": args.emb_size,
                "num_clusters": k,
                "batch_size": batch,
                "runs_timed": runs - min(int(runs * args.throw_out), runs - 1),
                "rounds": args.repeats,
                "throughput": 0.0,
                "agreement_with_sklearn": agreement,
            }
        for _ in range(args.repeats):  # interleaved rounds: a load spike hits one round of every framework
            for framework, runs in frameworks:
                bar.set_postfix_str(f"{framework} {linkage} n={n} B={batch}")
                throughput = measure_throughput(
                    lambda: agglomerative_clustering(metric, k, linkage, framework),
                    batch, runs, args.throw_out, args.device,
                    progress=bar.update,
                )
                bar.update(args.runs - runs)
                row = setting_rows[framework]
                row["throughput"] = max(row["throughput"], throughput)
        setting_rows = list(setting_rows.values())
        for r in setting_rows:
            r["ms_per_batch"] = 1000.0 * batch / r["throughput"]
        base = next((r["throughput"] for r in setting_rows if r["framework"] == "sklearn"), None)
        for r in setting_rows:
            r["speedup_vs_sklearn"] = r["throughput"] / base if base else float("nan")
        rows += setting_rows
    bar.close()

    csv_path = write_csv(rows, out_dir / "atc_framework_benchmark.csv")
    for linkage in args.linkage:
        part = [r for r in rows if r["linkage"] == linkage]
        if part:
            line_plot(part, "batch_size", "throughput", ["framework", "n_patches"],
                      out_dir / f"atc_framework_benchmark_{linkage}.png", logx=True, logy=True,
                      title=f"Clustering throughput, {linkage} linkage, C={args.emb_size}, "
                            f"K = {args.reduction_ratio:g} n", ylabel="samples / second")
    print(format_table(rows))
    print(f"\nwrote {csv_path} and plots in {out_dir}")
    bad = [r for r in rows if not math.isnan(r["agreement_with_sklearn"]) and r["agreement_with_sklearn"] < 1.0]
    if bad:
        print("WARNING: partitions differ from scikit-learn for: "
              + ", ".join(f"{r['framework']} {r['linkage']} n={r['n_patches']} B={r['batch_size']}" for r in bad),
              file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    header = "| framework | linkage | n | B | ms/batch | samples/s | speedup vs sklearn | same partition as sklearn |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        speedup = r["speedup_vs_sklearn"]
        agreement = r["agreement_with_sklearn"]
        lines.append(
            f"| {r['framework']} | {r['linkage']} | {r['n_patches']} | {r['batch_size']} | {r['ms_per_batch']:.2f} "
            f"| {r['throughput']:.0f} | {'n/a' if math.isnan(speedup) else f'{speedup:.1f}x'} "
            f"| {'n/a' if math.isnan(agreement) else f'{100 * agreement:.0f}%'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
