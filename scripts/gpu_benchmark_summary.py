#!/usr/bin/env python
"""Merge the CSVs of scripts/gpu_benchmark.sh and write its Markdown summary (key numbers next to the targets).

    python scripts/gpu_benchmark_summary.py --work /tmp/atc_gpu_benchmark.XXXX --out results/gpu_benchmark

Reads, under --work: ``status.tsv`` (one line per step: name, status, seconds, note),
``framework_*/atc_framework_benchmark.csv``, ``vit_*/throughput.csv`` and ``sd/*.csv``. Writes to --out:
``framework.csv``, ``vit.csv`` (a ``run`` column names the benchmark run each row comes from), ``sd.csv`` and
``summary.md``. Needs only the standard library (torch, triton and the like are imported only to report their
versions), so it also runs where a step failed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

# Issue 12's targets. Clustering: ms per call of the triton backend at the three --cluster_settings, in order.
CLUSTER_TARGETS = [(1.0, 0.3), (4.0, None), (20.0, None)]
VIT_TOME_TARGET = (0.95, 1.0)  # atc_<small> / tome_<small> img/s, keep 0.7, fp16, large batch
VIT_DEIT_TARGET = (1.05, None)  # atc_<base> / deit_<base>
SD_TARGET = 5.0  # SD UNet step with ATC / unpatched step (at most)
SD_FAST_TARGET = 1.0  # the same with a shared plan and tiles (issue 23: no slower than the unpatched step)
FRAMEWORK_ORDER = ["triton", "torch", "numba", "fastcluster", "scipy", "sklearn", "cuml"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="working folder of gpu_benchmark.sh (the steps' own outputs)")
    p.add_argument("--out", required=True, help="folder for the merged CSVs and summary.md")
    p.add_argument("--device", default="cuda", help="device the benchmarks ran on (for the header)")
    p.add_argument("--cluster_settings", default="196:256,576:256,4096:2",
                   help="the clustering settings of the key table as T:B pairs, in the order of the issue's "
                        "three targets (K = T/2, average linkage)")
    p.add_argument("--vit_small", default="small", help="model size whose atc/tome ratio is the key number")
    p.add_argument("--vit_base", default="base", help="model size whose atc/deit ratio is the key number")
    p.add_argument("--vit_batch", type=int, default=256, help="batch size of the key ViT ratios")
    p.add_argument("--vit_keep", type=float, default=0.7, help="keep rate of the key ViT ratios")
    p.add_argument("--sd_ratio", type=float, default=0.5, help="ATC ratio of the key SD number")
    p.add_argument("--elapsed", type=float, default=None, help="seconds the whole benchmark took")
    p.add_argument("--quick", action="store_true",
                   help="a QUICK run (tiny sizes): key numbers are shown but not compared with the targets")
    args = p.parse_args(argv)
    try:
        args.cluster_keys = [tuple(int(v) for v in s.split(":")) for s in args.cluster_settings.split(",")]
        assert all(len(k) == 2 for k in args.cluster_keys)
    except (ValueError, AssertionError):
        p.error(f"--cluster_settings must be comma-separated T:B pairs, got {args.cluster_settings!r}")
    return args


# ---------------------------------------------------------------------------------------------------- CSV input
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_csvs(paths: list[Path], out: Path, run_of=None) -> list[dict]:
    """Concatenate CSVs (columns: union in first-seen order; a ``run`` column first when ``run_of`` is given)."""
    rows: list[dict] = []
    for path in paths:
        for row in read_csv(path):
            rows.append({"run": run_of(path), **row} if run_of else row)
    if rows:
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(rows)
    return rows


def num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def same(a, b: float) -> bool:
    return math.isclose(num(a), b, rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------- formatting
def fmt(value: float, digits: int = 2, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def verdict(value: float, limit: float | None, at_most: bool, quick: bool) -> str:
    if limit is None:
        return ""
    if quick:
        return "n/a (quick run)"
    if value is None or math.isnan(value):
        return "not measured"
    ok = value <= limit if at_most else value >= limit
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------------------------------------------- environment
def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str) -> list[str]:
    lines = []
    gpu = "none"
    try:
        import torch

        cuda = torch.version.cuda or "none"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        torch_line = f"torch {torch.__version__} (CUDA {cuda})"
    except Exception as err:  # noqa: BLE001 (the summary is written whatever is broken)
        torch_line = f"torch not importable: {err}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            gpu += f"; nvidia-smi: {smi.stdout.strip().splitlines()[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    lines.append(f"- GPU: {gpu}; benchmarks ran on `--device {device}`")
    lines.append(f"- {torch_line}, triton {version('triton')}, timm {version('timm')}, numba {version('numba')}, "
                 f"scikit-learn {version('scikit-learn')}, diffusers {version('diffusers')}, "
                 f"Python {platform.python_version()}")
    lines.append(f"- host: {platform.node()} ({os.cpu_count()} CPUs); "
                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=20)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=20)
            changed = len(dirty.stdout.splitlines())
            lines.append(f"- repository: commit {commit.stdout.strip()}"
                         + (f" plus {changed} changed/untracked files" if changed else ""))
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


# ---------------------------------------------------------------------------------------------------- sections
def framework_section(rows: list[dict], args) -> tuple[list[list[str]], list[str]]:
    """Key rows for the clustering targets, and the full clustering table."""
    def find(framework: str, t: int, b: int) -> dict | None:
        return next((r for r in rows if r["framework"] == framework and r["linkage"] == "average"
                     and int(num(r["n_patches"])) == t and int(num(r["batch_size"])) == b), None)

    def ms(framework: str, t: int, b: int) -> float:
        r = find(framework, t, b)
        return num(r["ms_per_batch"]) if r and not r.get("error") else float("nan")

    key_rows = []
    for i, (t, b) in enumerate(args.cluster_keys):
        target, goal = CLUSTER_TARGETS[i] if i < len(CLUSTER_TARGETS) else (None, None)
        value = ms("triton", t, b)
        others = ", ".join(f"{f} {fmt(ms(f, t, b), 3)} ms" for f in ("torch", "numba") if not math.isnan(ms(f, t, b)))
        failed = (find("triton", t, b) or {}).get("error")
        if failed:
            others = f"triton failed: {failed[:120]}" + (f"; {others}" if others else "")
        key_rows.append([f"clustering, triton, B={b} T={t} K={t // 2} average (ms per call)",
                         "error" if failed else fmt(value, 3), f"≤ {target:g} ms" if target else "",
                         f"{goal:g} ms" if goal else "", verdict(value, target, True, args.quick), others])

    frameworks = sorted({r["framework"] for r in rows},
                        key=lambda f: FRAMEWORK_ORDER.index(f) if f in FRAMEWORK_ORDER else len(FRAMEWORK_ORDER))
    settings = sorted({(r["linkage"], int(num(r["n_patches"])), int(num(r["num_clusters"])), int(num(r["batch_size"])))
                       for r in rows})
    header = ["linkage", "T", "K", "B"] + [f"{f} ms" for f in frameworks]
    if "triton" in frameworks:
        header += [f"triton speed-up over {f}" for f in frameworks if f != "triton"]
    header.append("labels")
    lines = []
    for linkage, t, k, b in settings:
        part = {r["framework"]: r for r in rows if (r["linkage"], int(num(r["n_patches"])), int(num(r["num_clusters"])),
                                                    int(num(r["batch_size"]))) == (linkage, t, k, b)}
        times = {f: (num(part[f]["ms_per_batch"]) if f in part and not part[f].get("error") else float("nan"))
                 for f in frameworks}
        cells = [linkage, t, k, b]
        cells += [("error" if f in part and part[f].get("error") else fmt(times[f], 3)) for f in frameworks]
        if "triton" in frameworks:
            cells += [fmt(times[f] / times["triton"], 1, "x") for f in frameworks if f != "triton"]
        cells.append(labels_cell(part))
        lines.append(cells)
    full = table(header, lines) if lines else ["(no clustering results)"]
    errors = [f"- {r['framework']} T={r['n_patches']} B={r['batch_size']}: {r['error']}"
              for r in rows if r.get("error")]
    if errors:
        full += ["", "Errors:"] + errors
    return key_rows, full


def labels_cell(part: dict[str, dict]) -> str:
    """Whether every framework's labels matched scikit-learn (on the checked samples) and numba (on all)."""
    bad = []
    checked = ""
    for f, r in part.items():
        if r.get("error"):
            continue
        sk, nb = num(r.get("agreement_with_sklearn")), num(r.get("agreement_with_numba"))
        n = r.get("sklearn_checked_samples", "")
        if n not in ("", None):
            checked = f"{int(num(n))}/{r['batch_size']}"
        if (not math.isnan(sk) and sk < 1) or (not math.isnan(nb) and nb < 1):
            bad.append(f"{f} (sklearn {fmt(100 * sk, 0)}%, numba {fmt(100 * nb, 0)}%)")
    if bad:
        return "**differ**: " + ", ".join(bad)
    ran = [r for r in part.values() if not r.get("error")]
    if any(not math.isnan(num(r.get("agreement_with_sklearn"))) for r in ran):
        return f"same as sklearn ({checked} samples)" + (" and numba (all)" if "numba" in part else "")
    return "not checked" if ran else "n/a"


def vit_section(rows: list[dict], args) -> tuple[list[list[str]], list[str]]:
    def throughput(run: str, model: str, keep: float | None, batch: int) -> float:
        for r in rows:
            if (r["run"] == run and r["model"] == model and int(num(r["batch_size"])) == batch
                    and (same(r["reduction_ratio"], keep) if keep is not None else r["reduction_ratio"] == "")):
                return num(r["throughput"])
        return float("nan")

    key_rows = []
    b, kr = args.vit_batch, args.vit_keep
    s = args.vit_small
    atc, tome = (throughput(f"vit_{s}", f"{m}_{s}_patch16_224", kr, b) for m in ("atc", "tome"))
    deit = throughput(f"vit_{s}", f"deit_{s}_patch16_224", None, b)
    key_rows.append([f"atc_{s} / tome_{s} img/s, keep {kr:g}, batch {b}, autocast", fmt(atc / tome, 3, "x"),
                     f"≥ {VIT_TOME_TARGET[0]:g}x", f"{VIT_TOME_TARGET[1]:g}x",
                     verdict(atc / tome, VIT_TOME_TARGET[0], False, args.quick),
                     f"atc {fmt(atc, 0)}, tome {fmt(tome, 0)}, deit {fmt(deit, 0)} img/s"])
    s = args.vit_base
    atc, tome = (throughput(f"vit_{s}", f"{m}_{s}_patch16_224", kr, b) for m in ("atc", "tome"))
    deit = throughput(f"vit_{s}", f"deit_{s}_patch16_224", None, b)
    key_rows.append([f"atc_{s} / deit_{s} img/s, keep {kr:g}, batch {b}, autocast", fmt(atc / deit, 3, "x"),
                     f"≥ {VIT_DEIT_TARGET[0]:g}x", "", verdict(atc / deit, VIT_DEIT_TARGET[0], False, args.quick),
                     f"atc {fmt(atc, 0)}, tome {fmt(tome, 0)}, deit {fmt(deit, 0)} img/s; "
                     f"atc/tome {fmt(atc / tome, 3, 'x')}"])

    # the same ratios under torch.compile, where those runs happened (no targets: for the record)
    for run in sorted({r["run"] for r in rows if r["run"].startswith(f"vit_{args.vit_small}_compile_")}):
        s, mode = args.vit_small, run.removeprefix(f"vit_{args.vit_small}_compile_")
        for batch in sorted({int(num(r["batch_size"])) for r in rows if r["run"] == run}):
            atc, tome = (throughput(run, f"{m}_{s}_patch16_224", kr, batch) for m in ("atc", "tome"))
            deit = throughput(run, f"deit_{s}_patch16_224", None, batch)
            key_rows.append([f"atc_{s} / tome_{s} img/s, keep {kr:g}, batch {batch}, compile {mode}",
                             fmt(atc / tome, 3, "x"), "", "", "",
                             f"atc {fmt(atc, 0)}, tome {fmt(tome, 0)}, deit {fmt(deit, 0)} img/s; "
                             f"atc/deit {fmt(atc / deit, 3, 'x')}"])

    lines = []
    for r in rows:
        keep = r["reduction_ratio"]
        size = next((z for z in ("tiny", "small", "base", "large") if f"_{z}_" in r["model"]), "")
        batch = int(num(r["batch_size"]))
        tome_tp = throughput(r["run"], f"tome_{size}_patch16_224", num(keep), batch) if keep != "" else float("nan")
        vs_tome = fmt(num(r["throughput"]) / tome_tp, 3, "x") if r["model"].startswith("atc_") else ""
        lines.append([r["run"].removeprefix("vit_"), r["model"], keep or "-", batch, fmt(num(r["throughput"]), 1),
                      fmt(num(r.get("speedup")), 3, "x"), vs_tome])
    full = table(["run", "model", "keep", "batch", "img/s", "vs deit (same run)", "atc vs tome"], lines) if lines \
        else ["(no ViT results)"]
    return key_rows, full


def sd_section(rows: list[dict], args) -> tuple[list[list[str]], list[str]]:
    def plan(r: dict) -> str:
        parts = [str(r.get("plan") or "block")]
        if str(r.get("reuse_steps") or "1") not in ("1", "1.0"):
            parts.append(f"k{r['reuse_steps']}")
        if r.get("tile") and str(r["tile"]) != "nan":
            parts.append(f"tile {r['tile']}")
        return " ".join(parts)

    def step(method: str, ratio: float | None, setting: str = "block") -> float:
        for r in rows:
            if r["method"] == method and (ratio is None or same(r["reduction_ratio"], ratio)) and plan(r) == setting:
                return num(r["step_time_median_s"])
        return float("nan")

    none, atc, tome = step("none", None), step("atc", args.sd_ratio), step("tome", args.sd_ratio)
    fast_setting = next((plan(r) for r in rows if r["method"] == "atc" and plan(r).startswith("group") and "tile" in
                         plan(r)), "")
    fast = step("atc", args.sd_ratio, fast_setting) if fast_setting else float("nan")
    backend = next((r.get("backend", "") for r in rows if r["method"] == "atc"), "")
    config = f"{rows[0]['config']}, {rows[0].get('dtype', 'float32')}" if rows else "sd15"
    key_rows = [[f"SD UNet step ({config}) with ATC ratio {args.sd_ratio:g} / unpatched step",
                 fmt(atc / none, 2, "x"), f"≤ {SD_TARGET:g}x", "", verdict(atc / none, SD_TARGET, True, args.quick),
                 f"none {fmt(none, 4)} s, tome {fmt(tome, 4)} s, atc {fmt(atc, 4)} s"
                 + (f" (backend {backend})" if backend else "")],
                [f"SD UNet step ({config}) with ATC ratio {args.sd_ratio:g}, {fast_setting or 'group plan + tiles'}"
                 " / unpatched step", fmt(fast / none, 2, "x"), f"≤ {SD_FAST_TARGET:g}x", "",
                 verdict(fast / none, SD_FAST_TARGET, True, args.quick) if fast_setting else "not measured",
                 f"atc {fast_setting}: {fmt(fast, 4)} s" if fast_setting else "no group-plan + tile ATC row"]]
    lines = [[r["config"], r["method"], r["reduction_ratio"], plan(r), r.get("backend", ""), r.get("dtype", ""),
              r["latent_size"], fmt(num(r["step_time_median_s"]), 4), r["runs"],
              fmt(num(r["step_time_median_s"]) / none, 2, "x"), fmt(num(r.get("rel_error")), 4),
              fmt(num(r.get("plans_per_step")), 1)] for r in rows]
    full = table(["config", "method", "ratio", "plan", "backend", "dtype", "latent", "median s/step", "runs",
                  "step time vs none", "rel. error vs none", "merges/step"], lines) if lines \
        else ["(no Stable Diffusion results)"]
    return key_rows, full


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    framework = merge_csvs(sorted(work.glob("framework_*/atc_framework_benchmark.csv")), out / "framework.csv")
    sizes = ["tiny", "small", "base", "large"]
    vit = merge_csvs(sorted(work.glob("vit_*/throughput.csv"),
                            key=lambda p: ("_compile_" in p.parent.name,
                                           next((i for i, z in enumerate(sizes) if f"_{z}" in p.parent.name), 9),
                                           p.parent.name)),
                     out / "vit.csv", run_of=lambda p: p.parent.name)
    sd = merge_csvs(sorted(work.glob("sd/*.csv")), out / "sd.csv")
    status = []
    if (work / "status.tsv").is_file():
        status = [(line.split("\t") + ["", "", "", ""])[:4]
                  for line in (work / "status.tsv").read_text().splitlines() if line.strip()]

    fw_keys, fw_table = framework_section(framework, args)
    vit_keys, vit_table = vit_section(vit, args)
    sd_keys, sd_table = sd_section(sd, args)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# GPU benchmark (issue 12): {now}", ""]
    if args.quick:
        md += ["**QUICK run**: tiny sizes and models on `--device " + args.device + "` to test the pipeline; the "
               "key numbers below are the small stand-ins for the issue's settings and are not compared with its "
               "targets (those apply to the full run on a GPU).", ""]
    md += environment(args.device)
    if args.elapsed is not None:
        md.append(f"- whole benchmark: {args.elapsed:.0f} s")
    failed = [s for s in status if s[1].startswith(("failed", "timeout"))]
    skipped = [s for s in status if s[1] in ("skipped", "note")]
    md += ["", "## Key numbers against the issue's targets", ""]
    md += table(["measure", "this run", "target", "goal", "met", "same run, for reference"],
                fw_keys + vit_keys + sd_keys)
    if failed or skipped:
        md += [""] + [f"- **{s[0]}: {s[1]}** {s[3]}" for s in failed] + [f"- {s[0]}: {s[1]}: {s[3]}" for s in skipped]
    channels = ", ".join(sorted({r.get("emb_size", "") for r in framework}))
    md += ["", f"## Clustering step (`benchmark_atc_framework.py`, ms per call, K = T/2"
           + (f", C = {channels})" if channels else ")"), ""]
    md += ["Labels: every framework's labels are compared with scikit-learn on the first samples of each "
           "setting (all of them while samples x T^2 <= 2^24; the count is in the column) and with the numba "
           "backend on every sample.", ""]
    md += fw_table
    md += ["", "## ViT throughput (`benchmark_merging_method.py`, autocast: fp16 on CUDA, bf16 on CPU; average "
           "linkage, random weights)",
           ""]
    md += vit_table
    md += ["", "## Stable Diffusion UNet step (`SD_setup/benchmark_diffusion.py`, batch 2, random weights; relative "
           "error of the output against the unpatched output on the same inputs, over a short trajectory)", ""]
    md += sd_table
    warps = read_csv(out / "triton_warps.csv") if (out / "triton_warps.csv").is_file() else []
    md += ["", "## Triton kernel: warps per sample (`scripts/triton_warps_sweep.py`, average linkage, K = T/2)", ""]
    md += table(["T", "B", "warps", "ms per call", "default warps", "default ms", "speed-up vs default",
                 "labels identical"],
                [[r["tokens"], r["batch"], r["warps"], r["ms_per_call"], r["default_warps"],
                  r["default_ms_per_call"], r["speedup_vs_default"], r["labels_identical"]] for r in warps]
                ) if warps else ["(not run)"]
    md += ["", "## Steps", ""]
    md += table(["step", "status", "seconds", "note"], [s for s in status]) if status else ["(no step record)"]
    md += ["", "Files: " + ", ".join(p.name for p in sorted(out.iterdir()) if p.is_file() and p.name != "summary.md")
           + ", summary.md"]
    path = out / "summary.md"
    path.write_text("\n".join(md) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
