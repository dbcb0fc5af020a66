#!/usr/bin/env python
"""Time the triton clustering kernel at several warp counts per sample (to tune its launch configuration).

The kernel runs one program per sample; ``atc._triton_cluster.launch_config`` picks the warps per program from
the token count. This sweep times every ``--warps`` value (through ``ATC_TRITON_NUM_WARPS``) against the default
on the same inputs, checks the labels are identical, and writes a CSV with the time per call and the ratio to
the default. Run it on a GPU (``scripts/gpu_benchmark.sh`` does); on CPU it needs ``TRITON_INTERPRET=1`` and is
only a smoke test.

Example:
    python scripts/triton_warps_sweep.py --device cuda --tokens 196 576 --batches 1 256 --output sweep.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

from atc.benchmark import synchronize
from atc.cluster import agglomerative_clustering, available_backends


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="device of the metric (cuda, or cpu under TRITON_INTERPRET=1)")
    p.add_argument("--tokens", nargs="+", type=int, default=[196, 576], help="token counts T")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256], help="batch sizes B")
    p.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                   help="warps per program to time (powers of two up to 32)")
    p.add_argument("--keep", type=float, default=0.5, help="clusters kept as a fraction of T: K = int(T * keep)")
    p.add_argument("--linkage", default="average", help="linkage function")
    p.add_argument("--emb_size", type=int, default=64, help="channels C of the metric")
    p.add_argument("--runs", type=int, default=20, help="timed calls per setting (after 3 warm-up calls)")
    p.add_argument("--max_elements", type=float, default=2.0**28,
                   help="skip settings whose distance matrices B*T*T exceed this many elements")
    p.add_argument("--output", default="results/triton_warps.csv", help="CSV file to write")
    args = p.parse_args(argv)
    if any(w < 1 or w > 32 or w & (w - 1) for w in args.warps):
        p.error(f"--warps must be powers of two between 1 and 32, got {args.warps}")
    if not 0 < args.keep < 1:
        p.error(f"--keep must be in (0, 1), got {args.keep}")
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available here")
    if "triton" not in available_backends():
        p.error("the triton backend is not available here (a CUDA GPU with Triton, or TRITON_INTERPRET=1 on CPU)")
    return args


def time_call(fn, runs: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / runs * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from atc._triton_cluster import launch_config

    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    saved = os.environ.pop("ATC_TRITON_NUM_WARPS", None)
    try:
        for t in args.tokens:
            for b in args.batches:
                if b * t * t > args.max_elements:
                    print(f"T={t} B={b}: skipped (B*T*T > --max_elements)")
                    continue
                metric = torch.randn(b, t, args.emb_size, generator=gen).to(args.device)
                k = max(1, int(t * args.keep))
                default_warps = launch_config(t, b, interpreted=False)[2]
                run = lambda: agglomerative_clustering(metric, k, args.linkage, "triton")  # noqa: E731
                reference = run()
                base_ms = time_call(run, args.runs, args.device)
                for w in args.warps:
                    os.environ["ATC_TRITON_NUM_WARPS"] = str(w)
                    try:
                        same = bool(torch.equal(run(), reference))
                        ms = time_call(run, args.runs, args.device)
                        error = ""
                    except Exception as e:  # noqa: BLE001 - a failing configuration is a result to record
                        same, ms, error = False, float("nan"), f"{type(e).__name__}: {e}"[:200]
                    finally:
                        del os.environ["ATC_TRITON_NUM_WARPS"]
                    rows.append({"tokens": t, "batch": b, "num_clusters": k, "warps": w,
                                 "default_warps": default_warps, "ms_per_call": round(ms, 4),
                                 "default_ms_per_call": round(base_ms, 4),
                                 "speedup_vs_default": round(base_ms / ms, 3) if ms == ms else float("nan"),
                                 "labels_identical": same, "error": error})
                    print(f"T={t} B={b} warps={w}: {ms:.3f} ms (default {default_warps} warps: {base_ms:.3f} ms)"
                          f"{'' if same else '  LABELS DIFFER' if not error else '  ' + error}")
    finally:
        if saved is not None:
            os.environ["ATC_TRITON_NUM_WARPS"] = saved
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["tokens"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    if any(not r["labels_identical"] for r in rows):
        sys.exit("some warp counts gave different labels or failed (see the CSV)")
    return rows


if __name__ == "__main__":
    main()
