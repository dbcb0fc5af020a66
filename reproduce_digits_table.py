#!/usr/bin/env python
"""The main job: a miniature of the paper's classification table on scikit-learn's bundled digits.

1. Train a small ViT (DeiT recipe, no reduction) on digits.
2. For no reduction, ToMe and ATC (single / complete / average linkage), at several keep rates: evaluate the
   trained weights off the shelf, then after a short fine-tune with the reduction in place.
3. Write ``results.csv``, ``results.md`` (the table) and ``results.png`` (Top-1 vs keep rate) to --output_dir.

Resumable: finished rows in results.csv are skipped and interrupted trainings continue from their checkpoints.
Defaults take about 4-6 minutes on 2 CPU cores:

    python reproduce_digits_table.py --output_dir results/digits_table
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from atc.checkpoint import load_checkpoint
from atc.cli import ConfigError
from atc.data import build_loaders
from atc.engine import FitConfig, evaluate, fit
from atc.models import build_classifier, validate_reduction
from atc.utils import line_plot, seed_everything, write_csv, atomic_write_text

METHODS = ("none", "tome", "atc_single", "atc_complete", "atc_average")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("reproduce_digits_table.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="results/digits_table", help="where results and checkpoints go")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--keep_rates", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.25],
                   help="keep rates in (0, 1] (tokens after location i: int(N * kr^(i+1)))")
    p.add_argument("--reduction_loc", type=int, nargs="+", default=[1, 3, 5],
                   help="0-indexed reduction blocks (the paper's 3 6 9, scaled to a 6-block model)")
    p.add_argument("--input-size", type=int, default=32, help="image side (digits are upsampled from 8x8)")
    p.add_argument("--patch-size", type=int, default=4, help="ViT patch size (32/4 -> 64 tokens)")
    p.add_argument("--embed-dim", type=int, default=96, help="ViT width")
    p.add_argument("--depth", type=int, default=6, help="ViT blocks")
    p.add_argument("--num-heads", type=int, default=3, help="attention heads")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the base model")
    p.add_argument("--lr", type=float, default=1e-3, help="base-model learning rate (AdamW, cosine)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per method and keep rate")
    p.add_argument("--finetune-lr", type=float, default=2e-4, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--throughput-runs", type=int, default=6, help="timed eval batches per row (0 = skip)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    return p


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth,
            "num_heads": args.num_heads}


def build(args: argparse.Namespace, method: str, keep_rate: float) -> nn.Module:
    """``none`` -> plain timm DeiT; ``tome`` / ``atc_<linkage>`` -> the registered atc.models variants."""
    if method == "none":
        return build_classifier("deit_tiny_patch16_224", 10, args.input_size, model_kwargs=model_kwargs(args))
    family, _, linkage = method.partition("_")
    return build_classifier(f"{family}_tiny_patch16_224", 10, args.input_size, reduction_loc=args.reduction_loc,
                            keep_rate=keep_rate, linkage=linkage or "average", proportional_attn=True,
                            model_kwargs=model_kwargs(args))


def train(args: argparse.Namespace, model: nn.Module, out: Path, epochs: int, lr: float, warmup: int,
          loaders: tuple[Any, Any]) -> dict[str, Any]:
    """Fit with AdamW + cosine (resuming from ``out/checkpoint.pth`` if a previous run was interrupted)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    train_loader, val_loader = loaders
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.05)
    sched, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-6,
                                   min_lr=1e-6, step_on_epochs=False, updates_per_epoch=len(train_loader))
    resume = out / "checkpoint.pth" if (out / "checkpoint.pth").is_file() else None
    cfg = FitConfig(epochs=epochs, output_dir=str(out), sched_in_steps=True, eval_before_training=False,
                    progress=False, args={"epochs": epochs, "lr": lr})
    return fit(cfg, model, train_loader, val_loader, nn.CrossEntropyLoss(), optimizer, torch.device("cpu"),
               lr_scheduler=sched, resume_from=resume, log=lambda s: tqdm.write("  " + s))


def throughput(model: nn.Module, args: argparse.Namespace) -> float:
    if args.throughput_runs <= 0:
        return float("nan")
    from atc.benchmark import measure_throughput

    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    model.eval()
    with torch.no_grad():
        return measure_throughput(lambda: model(x), args.batch_size, args.throughput_runs + 2,
                                  throw_out=2 / (args.throughput_runs + 2))


def tokens_after(args: argparse.Namespace, keep_rate: float) -> str:
    n = (args.input_size // args.patch_size) ** 2
    return "/".join(str(int(n * keep_rate ** (i + 1))) for i in range(len(args.reduction_loc)))


def tome_cap_note(args: argparse.Namespace, keep_rate: float) -> str:
    """ToMe merges at most half of the tokens per location; say so when a keep rate asks for more."""
    prev = (args.input_size // args.patch_size) ** 2
    for i in range(len(args.reduction_loc)):
        target = int((args.input_size // args.patch_size) ** 2 * keep_rate ** (i + 1))
        if prev - target > prev // 2:
            return (f"ToMe removes at most half the tokens per location: keep rate {keep_rate:g} asks for "
                    f"{prev} -> {target} tokens at block {args.reduction_loc[i]}, so ToMe keeps more tokens here")
        prev = target
    return ""


def markdown_table(frame: pd.DataFrame, rates: list[float]) -> str:
    """Rows: method; columns: keep rate x {off the shelf, fine-tuned} Top-1."""
    rates = sorted(rates, reverse=True)
    base = frame[frame.method == "none"]
    lines = ["| method | " + " | ".join(f"kr {r:g} OTS | kr {r:g} FT" for r in rates) + " |",
             "|---|" + "---|" * (2 * len(rates))]
    if len(base):
        cells = []
        for _ in rates:
            for setting in ("off-the-shelf", "fine-tuned"):
                v = base.loc[base.setting == setting, "top1"]
                cells.append(f"{v.iloc[0]:.2f}" if len(v) else "")
        lines.append("| no reduction (kr 1) | " + " | ".join(cells) + " |")
    for method in [m for m in METHODS if m != "none" and m in set(frame.method)]:
        cells = []
        for r in rates:
            for setting in ("off-the-shelf", "fine-tuned"):
                v = frame[(frame.method == method) & (frame.keep_rate == r) & (frame.setting == setting)]
                if not len(v):
                    cells.append("")
                elif isinstance(v.note.iloc[0], str) and v.note.iloc[0]:
                    top1 = v.top1.iloc[0]
                    cells.append("n/a*" if isinstance(top1, float) and math.isnan(top1) else f"{top1:.2f}*")
                else:
                    cells.append(f"{v.top1.iloc[0]:.2f}")
        lines.append(f"| {method.replace('_', ' ')} | " + " | ".join(cells) + " |")
    notes = sorted({n for n in frame.note.dropna() if isinstance(n, str) and n})
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"\\* {n}" for n in notes) + "\n"
    return text


def main(args: argparse.Namespace) -> pd.DataFrame:
    t_start = time.time()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    validate_reduction(args.keep_rates, args.reduction_loc, None, args.depth)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows: list[dict[str, Any]] = pd.read_csv(csv_path).to_dict("records") if csv_path.is_file() else []
    done = {(r["method"], float(r["keep_rate"]), r["setting"]) for r in rows}
    # Fail early on a method the installed model registry cannot build.
    for method in args.methods:
        build(args, method, args.keep_rates[0])

    seed_everything(args.seed)
    train_loader, val_loader, _ = build_loaders(
        "digits", None, args.input_size, args.batch_size, seed=args.seed, aa=None, reprob=0.0, color_jitter=0.0,
        no_aug=True)
    loaders = (train_loader, val_loader)

    base_dir = out / "base"
    seed_everything(args.seed)
    base = build(args, "none", 1.0)
    print(f"[1/2] base ViT ({sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params, "
          f"{(args.input_size // args.patch_size) ** 2} tokens): training {args.epochs} epochs -> {base_dir}")
    train(args, base, base_dir, args.epochs, args.lr, warmup=2, loaders=loaders)

    jobs = [("none", 1.0)] + [(m, kr) for m in args.methods if m != "none" for kr in args.keep_rates]
    if "none" not in args.methods:
        jobs = jobs[1:]
    print(f"[2/2] {len(jobs)} configurations x (off the shelf, fine-tuned {args.finetune_epochs} epochs)")
    bar = tqdm(jobs, desc="table", dynamic_ncols=True)
    for method, kr in bar:
        bar.set_postfix(method=method, keep_rate=kr)
        for setting in ("off-the-shelf", "fine-tuned"):
            if (method, float(kr), setting) in done:
                continue
            row: dict[str, Any] = {"method": method, "keep_rate": kr, "setting": setting,
                                   "tokens_after_locs": "64" if method == "none" else tokens_after(args, kr),
                                   "note": tome_cap_note(args, kr) if method == "tome" else ""}
            try:
                seed_everything(args.seed)
                model = build(args, method, kr)
            except ConfigError as exc:  # e.g. ToMe cannot remove more than half the tokens per location
                row.update(top1=float("nan"), top5=float("nan"), img_per_s=float("nan"), note=str(exc).rstrip("."))
                rows.append(row)
                write_csv(rows, csv_path)
                continue
            load_checkpoint(model, base_dir / "checkpoint.pth")
            if setting == "fine-tuned":
                ft_dir = out / "finetune" / f"{method}_kr{kr:g}"
                seed_everything(args.seed)
                train(args, model, ft_dir, args.finetune_epochs, args.finetune_lr, warmup=0, loaders=loaders)
                load_checkpoint(model, ft_dir / "checkpoint.pth")
            res = evaluate(model, val_loader, torch.device("cpu"), progress=False)
            row.update(top1=round(res["top1"], 2), top5=round(res["top5"], 2), img_per_s=round(throughput(model, args), 1))
            rows.append(row)
            write_csv(rows, csv_path)  # after every row: an interrupted run loses nothing
    frame = pd.DataFrame(rows)
    table = markdown_table(frame, list(args.keep_rates))
    atomic_write_text(
        f"# ATC on digits ({args.input_size}px, patch {args.patch_size}, depth {args.depth}, width {args.embed_dim}; "
        f"reduction after blocks {' '.join(map(str, args.reduction_loc))}; Top-1 % on the 360-image val split)\n\n"
        + table, out / "results.md")
    plot_rows = []
    for r in rows:
        if r["method"] == "none":
            plot_rows += [{**r, "keep_rate": k} for k in args.keep_rates]
        elif not (isinstance(r["top1"], float) and math.isnan(r["top1"])):
            plot_rows.append(r)
    line_plot(plot_rows, x="keep_rate", y="top1", group=["method", "setting"], path=out / "results.png",
              title="Digits: Top-1 vs keep rate", xlabel="keep rate", ylabel="Top-1 (%)")
    print(table)
    print(f"wrote {csv_path}, {out / 'results.md'}, {out / 'results.png'} in {time.time() - t_start:.0f} s")
    return frame


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
