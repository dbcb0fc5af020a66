#!/usr/bin/env python
"""Benchmark the agglomerative-clustering step of ATC across backends (the paper's framework benchmark).

Times exactly what ATC does per reduction step: normalise the metric, cosine distances, cluster every sample
into K = int(n * reduction_ratio) clusters, labels back on the metric's device. Every backend's labels are
checked against scikit-learn's (the published reference) on the same inputs: on every sample of small settings,
on the first samples of large ones (see --check_samples; the CSV says how many), and against the numba backend
on every sample when numba is among the frameworks. Backends are timed in ``--repeats`` interleaved rounds (best
round counts), so the ratios are fair on a shared machine; on CUDA every timing waits for the GPU to finish.
Writes a CSV and a PNG plot (throughput vs batch size, one line per backend and token count) to --output_dir.

Example (the published command, plus our backends):
    python benchmark_atc_framework.py --output_dir results/framework --framework all \
        --input_sizes 224 384 512 --emb_size 64 --runs 20 --batch_sizes 0 2 4 6 --reduction_ratio 0.5

Token counts and batch sizes can also be given directly:
    python benchmark_atc_framework.py --device cuda --framework triton torch numba \
        --tokens 196 576 1024 --batches 1 64 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from atc.benchmark import measure_throughput, synchronize
from atc.cluster import BACKENDS, LINKAGES, agglomerative_clustering, available_backends
from atc.utils import line_plot, write_csv

# The published script's framework names, mapped to our backends.
ALIASES = {"rapids": "cuml"}
# --check_samples auto: scikit-learn sees at most this many distance entries (samples x T x T) per setting, so the
# check stays a few seconds at T = 4096 (one sample) while small settings are checked on every sample.
CHECK_BUDGET = 2**24
# CSV columns: the published script's first, then ours.
COLUMNS = ("framework", "linkage", "input_size", "n_patches", "emb_size", "num_clusters", "batch_size", "runs_timed",
           "rounds", "throughput", "agreement_with_sklearn", "ms_per_batch", "speedup_vs_sklearn",
           "sklearn_checked_samples", "agreement_with_numba", "device", "dtype", "error")


def _check_samples(value: str) -> str | int:
    if value in ("auto", "all"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'all' or a positive number of samples, got {value!r}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--framework", nargs="+", default=["all"],
                   help="backends to time: any of %s, 'rapids' (= cuml), 'auto', or 'all' (every backend "
                        "available here)" % ", ".join(BACKENDS))
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--input_sizes", nargs="+", type=int, default=[224],
                       help="image sizes; the token count is n = (size / patch_size)^2")
    sizes.add_argument("--tokens", nargs="+", type=int, default=None,
                       help="token counts n given directly, instead of --input_sizes (e.g. 196 576 1024 4096)")
    p.add_argument("--patch_size", type=int, default=16, help="ViT patch size used to turn input sizes into n")
    p.add_argument("--emb_size", type=int, default=64, help="channels C of the clustering metric")
    p.add_argument("--runs", type=int, default=20, help="timed iterations per setting (including warm-up)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over all frameworks per setting, interleaved so that machine load affects all "
                        "alike; each framework's best round counts")
    p.add_argument("--throw_out", type=float, default=0.25,
                   help="fraction of the runs at the start used as warm-up and not timed")
    batches = p.add_mutually_exclusive_group()
    batches.add_argument("--batch_sizes", nargs="+", type=int, default=[0, 2, 4, 6],
                         help="batch sizes as exponents of 2 (6 -> 64 samples), as in the published script")
    batches.add_argument("--batches", nargs="+", type=int, default=None,
                         help="batch sizes as plain numbers of samples, instead of --batch_sizes (e.g. 1 64 256)")
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
    p.add_argument("--check_samples", type=_check_samples, default="auto",
                   help="samples per setting whose labels are checked against scikit-learn: 'all', a number "
                        "(the first N samples), or 'auto' (all while samples x n^2 <= %d, else as many as fit, "
                        "at least one: scikit-learn is slow at large n)" % CHECK_BUDGET)
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
    if args.batches is not None:
        if any(b < 1 for b in args.batches):
            p.error(f"--batches are numbers of samples and must be at least 1, got {args.batches}")
        args.batch_list = list(args.batches)
    else:
        if any(b < 0 or b > 16 for b in args.batch_sizes):
            p.error(f"--batch_sizes are exponents of 2 between 0 and 16, got {args.batch_sizes} "
                    "(use --batches for plain numbers of samples)")
        args.batch_list = [2**e for e in args.batch_sizes]
    if args.patch_size < 1:
        p.error(f"--patch_size must be positive, got {args.patch_size}")
    if args.tokens is not None:
        if any(n < 1 for n in args.tokens):
            p.error(f"--tokens are token counts and must be at least 1, got {args.tokens}")
        args.token_list = [(_input_size(n, args.patch_size), n) for n in args.tokens]
    else:
        if any(s < args.patch_size or s % args.patch_size for s in args.input_sizes):
            p.error(f"--input_sizes must be positive multiples of --patch_size {args.patch_size}, got "
                    f"{args.input_sizes} (use --tokens for token counts)")
        args.token_list = [(s, (s // args.patch_size) ** 2) for s in args.input_sizes]
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


def _input_size(n: int, patch_size: int) -> int | str:
    """The square image size with n patches, or '' when n is not a square."""
    side = math.isqrt(n)
    return side * patch_size if side * side == n else ""


def _num_checked(check: str | int, batch: int, n: int) -> int:
    if check == "all":
        return batch
    if check == "auto":
        return min(batch, max(1, CHECK_BUDGET // (n * n)))
    return min(batch, int(check))


def _agreement(labels: torch.Tensor, reference: torch.Tensor | None) -> float:
    """Fraction of samples whose labels equal the reference's (over the reference's samples)."""
    if reference is None or labels is None:
        return float("nan")
    part = labels[: reference.shape[0]].cpu()
    return (part == reference.cpu()).all(dim=1).float().mean().item()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32
    if args.use_amp:
        dtype = torch.float16 if args.device.type == "cuda" else torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed)

    settings = [(linkage, size, n, batch)
                for linkage in args.linkage for size, n in args.token_list for batch in args.batch_list]
    rows: list[dict] = []
    bar = tqdm(total=len(settings) * len(args.frameworks) * args.runs * args.repeats, desc="clustering", unit="run")
    for linkage, size, n, batch in settings:
        k = max(1, int(n * args.reduction_ratio))
        metric = torch.randn(batch, n, args.emb_size, generator=gen).to(device=args.device, dtype=dtype)
        checked = 0 if args.no_check else _num_checked(args.check_samples, batch, n)
        reference = None
        if checked:
            reference = agglomerative_clustering(metric[:checked], k, linkage, backend="sklearn")
        setting_rows: dict[str, dict] = {}
        labels: dict[str, torch.Tensor] = {}
        frameworks = []
        for framework in args.frameworks:
            if framework == "cuml" and linkage != "single":
                bar.update(args.runs * args.repeats)
                tqdm.write(f"skipping cuml for {linkage} linkage: RAPIDS supports single linkage only")
                continue
            row = setting_rows[framework] = {
                "framework": framework, "linkage": linkage, "input_size": size, "n_patches": n,
                "emb_size": args.emb_size, "num_clusters": k, "batch_size": batch, "runs_timed": 0,
                "rounds": args.repeats, "throughput": 0.0, "agreement_with_sklearn": float("nan"),
            }
            # One failing backend (a size limit, out of memory) is reported in its row; the others still run.
            try:
                labels[framework] = agglomerative_clustering(metric, k, linkage, framework)  # also warms up JIT
                runs = args.runs
                if args.max_seconds > 0:
                    synchronize(args.device)
                    start = time.perf_counter()
                    agglomerative_clustering(metric, k, linkage, framework)
                    synchronize(args.device)
                    per_run = time.perf_counter() - start
                    runs = max(1, min(args.runs, int(args.max_seconds / args.repeats / max(per_run, 1e-9))))
            except Exception as err:  # noqa: BLE001 (any backend failure is recorded, not fatal)
                row.update(throughput=float("nan"), error=f"{type(err).__name__}: {err}".replace("\n", " "))
                tqdm.write(f"ERROR: {framework} {linkage} n={n} B={batch}: {row['error']}")
                bar.update(args.runs * args.repeats)
                continue
            frameworks.append((framework, runs))
            row["runs_timed"] = runs - min(int(runs * args.throw_out), runs - 1)
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
        numba_labels = labels.get("numba")
        for framework, row in setting_rows.items():
            row["ms_per_batch"] = 1000.0 * batch / row["throughput"] if row["throughput"] > 0 else float("nan")
            row["agreement_with_sklearn"] = _agreement(labels.get(framework), reference)
        base = next((r["throughput"] for r in setting_rows.values() if r["framework"] == "sklearn"), None)
        for framework, row in setting_rows.items():
            row["speedup_vs_sklearn"] = row["throughput"] / base if base else float("nan")
            row["sklearn_checked_samples"] = checked if framework in labels else 0
            row["agreement_with_numba"] = _agreement(labels.get(framework), numba_labels)
            row["device"] = str(args.device)
            row["dtype"] = str(dtype).removeprefix("torch.")
            row.setdefault("error", "")
        rows += [{c: row[c] for c in COLUMNS} for row in setting_rows.values()]
        del metric, labels, reference
    bar.close()

    csv_path = write_csv(rows, out_dir / "atc_framework_benchmark.csv")
    for linkage in args.linkage:
        part = [r for r in rows if r["linkage"] == linkage and r["throughput"] > 0]
        if part:
            line_plot(part, "batch_size", "throughput", ["framework", "n_patches"],
                      out_dir / f"atc_framework_benchmark_{linkage}.png", logx=True, logy=True,
                      title=f"Clustering throughput, {linkage} linkage, C={args.emb_size}, "
                            f"K = {args.reduction_ratio:g} n", ylabel="samples / second")
    print(format_table(rows))
    if not args.no_check:
        print("\nlabels checked against scikit-learn on the first N of B samples per setting (--check_samples "
              f"{args.check_samples}; column 'checked'), and against numba on all B samples when numba ran")
    print(f"\nwrote {csv_path} and plots in {out_dir}")
    bad = [r for r in rows if any(not math.isnan(r[c]) and r[c] < 1.0
                                  for c in ("agreement_with_sklearn", "agreement_with_numba"))]
    if bad:
        print("WARNING: partitions differ from scikit-learn or numba for: "
              + ", ".join(f"{r['framework']} {r['linkage']} n={r['n_patches']} B={r['batch_size']}" for r in bad),
              file=sys.stderr)
    failed = [r for r in rows if r["error"]]
    if failed:
        print("ERROR: some settings failed: "
              + "; ".join(f"{r['framework']} {r['linkage']} n={r['n_patches']} B={r['batch_size']}: {r['error']}"
                          for r in failed), file=sys.stderr)
    return rows


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f}%"


def format_table(rows: list[dict]) -> str:
    header = ("| framework | linkage | n | K | B | ms/batch | samples/s | speedup vs sklearn "
              "| same partition as sklearn (checked) | same as numba |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        speedup = r["speedup_vs_sklearn"]
        timing = (f"{r['ms_per_batch']:.3f} | {r['throughput']:.0f}" if not r["error"]
                  else f"error: {r['error'][:60]} | n/a")
        checked = f"{_percent(r['agreement_with_sklearn'])} ({r['sklearn_checked_samples']}/{r['batch_size']})"
        lines.append(
            f"| {r['framework']} | {r['linkage']} | {r['n_patches']} | {r['num_clusters']} | {r['batch_size']} "
            f"| {timing} | {'n/a' if math.isnan(speedup) else f'{speedup:.1f}x'} | {checked} "
            f"| {_percent(r['agreement_with_numba'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(1 if any(r["error"] for r in main()) else 0)
