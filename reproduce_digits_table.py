#!/usr/bin/env python
"""The main job: a miniature of the paper's classification table on scikit-learn's bundled digits.

For every seed:
1. Train a small ViT (DeiT recipe, no reduction) on digits.
2. For no reduction, ToMe and ATC (single / complete / average linkage), at several keep rates: evaluate the
   trained weights off the shelf, then after a short fine-tune with the reduction in place. Every configuration
   also records its token count after each reduction location and its GFLOPs per image (counted on the reduced
   model), so methods can be compared at equal cost as well as at equal keep rate.
3. Write ``results.csv`` (one row per seed, configuration and setting), ``results.md`` (mean +- std over the
   seeds) and ``results.png`` (Top-1 vs GFLOPs, off the shelf and fine-tuned side by side) to --output_dir.

Resumable: finished rows in results.csv are skipped and interrupted trainings continue from their checkpoints.
Defaults take about 13 minutes on 2 idle CPU cores (measured: 783 s):

    python reproduce_digits_table.py --output_dir results/digits_table
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from atc.checkpoint import load_state_dict_checked, read_checkpoint, state_dict_from_checkpoint
from atc.cli import ConfigError
from atc.data import build_loaders
from atc.engine import FitConfig, evaluate, fit
from atc.models import build_classifier, validate_reduction
from atc.utils import atomic_write_text, errorbar_plot, seed_everything, set_threads, write_csv

METHODS = ("none", "tome", "atc_single", "atc_complete", "atc_average")
SETTINGS = ("off-the-shelf", "fine-tuned")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("reproduce_digits_table.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="results/digits_table", help="where results and checkpoints go")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--keep_rates", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.25],
                   help="keep rates in (0, 1] (patch tokens after location i: int(N * kr^(i+1)))")
    p.add_argument("--reduction_loc", type=int, nargs="+", default=[1, 3, 5],
                   help="0-indexed reduction blocks (the paper's 3 6 9, scaled to a 6-block model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one base model, fine-tune and table row per seed; results.md reports mean +- std")
    p.add_argument("--input-size", type=int, default=32, help="image side (digits are upsampled from 8x8)")
    p.add_argument("--patch-size", type=int, default=4, help="ViT patch size (32/4 -> 64 tokens)")
    p.add_argument("--embed-dim", type=int, default=96, help="ViT width")
    p.add_argument("--depth", type=int, default=6, help="ViT blocks")
    p.add_argument("--num-heads", type=int, default=3, help="attention heads")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the base model")
    p.add_argument("--lr", type=float, default=1e-3, help="base-model learning rate (AdamW, cosine)")
    p.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up epochs of the base model")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per method and keep rate")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning peak learning rate (cosine)")
    p.add_argument("--finetune-warmup-epochs", type=int, default=1, help="linear warm-up epochs of the fine-tune")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--throughput-runs", type=int, default=4,
                   help="timed eval batches per configuration, measured once per run (0 = skip)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads and ATC clustering threads (atc.cluster.set_num_threads); 0 = the defaults "
                        "(torch: every core, clustering: 1). Use 1 on a machine whose cores are busy with other work "
                        "(see docs/training.md)")
    return p


def split_method(name: str) -> tuple[str, str]:
    """``"atc_average"`` -> ``("atc", "average")``; ``"tome"`` -> ``("tome", "")``."""
    method, _, linkage = name.partition("_")
    return method, linkage


def display_name(method: str, linkage: str) -> str:
    return {"none": "no reduction", "tome": "ToMe"}.get(method, f"ATC {linkage}")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth,
            "num_heads": args.num_heads}


def build(args: argparse.Namespace, name: str, keep_rate: float) -> nn.Module:
    """``none`` -> plain timm DeiT; ``tome`` / ``atc_<linkage>`` -> the registered atc.models variants."""
    if name == "none":
        return build_classifier("deit_tiny_patch16_224", 10, args.input_size, model_kwargs=model_kwargs(args))
    method, linkage = split_method(name)
    return build_classifier(f"{method}_tiny_patch16_224", 10, args.input_size, reduction_loc=args.reduction_loc,
                            keep_rate=keep_rate, linkage=linkage or "average", proportional_attn=True,
                            model_kwargs=model_kwargs(args))


def train(model: nn.Module, out: Path, epochs: int, lr: float, warmup: int,
          loaders: tuple[Any, Any]) -> dict[str, Any]:
    """Fit with AdamW + cosine to 1e-6 (resuming from ``out/checkpoint.pth`` if a previous run was interrupted).
    ``model`` ends with the last epoch's weights; returns that epoch's log row (``val_top1``...), or ``{}`` when the
    checkpoint already held every epoch."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    train_loader, val_loader = loaders
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.05)
    sched, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-6,
                                   min_lr=1e-6, step_on_epochs=False, updates_per_epoch=len(train_loader))
    resume = out / "checkpoint.pth" if (out / "checkpoint.pth").is_file() else None
    cfg = FitConfig(epochs=epochs, output_dir=str(out), sched_in_steps=True, eval_before_training=False,
                    progress=False, args={"epochs": epochs, "lr": lr, "warmup_epochs": warmup})
    return fit(cfg, model, train_loader, val_loader, nn.CrossEntropyLoss(), optimizer, torch.device("cpu"),
               lr_scheduler=sched, resume_from=resume, log=lambda s: tqdm.write("  " + s))


def profile(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Patch tokens (class token not counted) after each reduction location, GFLOPs per image and images/s of
    ``model`` as built: shapes, not weights, decide them, so they are the same for every seed and setting."""
    from atc.benchmark import count_flops, measure_throughput, tokens_per_block

    model.eval()
    image = torch.zeros(1, 3, args.input_size, args.input_size)
    row: dict[str, Any] = {"gflops": round(count_flops(model, image) / 1e9, 5)}
    info = getattr(model, "_atc_info", None) or {}
    prefix = info.get("protected", model.num_prefix_tokens)
    per_block = [t - prefix for t in tokens_per_block(model)]
    for loc in args.reduction_loc:
        row[f"tokens_after_block{loc}"] = per_block[loc]
    row["final_tokens"] = per_block[-1]
    row["capped"] = bool(info.get("capped", False))
    row["img_per_s"] = float("nan")
    if args.throughput_runs > 0:
        x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
        with torch.no_grad():
            row["img_per_s"] = round(measure_throughput(lambda: model(x), args.batch_size, args.throughput_runs + 1,
                                                        throw_out=1 / (args.throughput_runs + 1)), 1)
    return row


def _mean_std(values: pd.Series, digits: int = 2) -> str:
    def fmt(x: float) -> str:
        return f"{x + 0.0:.{digits}f}".replace(f"-{0:.{digits}f}", f"{0:.{digits}f}")  # no "-0.00"

    values = values.dropna()
    if not len(values):
        return "n/a"
    if len(values) == 1:
        return fmt(values.iloc[0])
    return f"{fmt(values.mean())} ± {fmt(values.std())}"


def summarize(frame: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """One row per configuration: cost columns, Top-1 mean/std per setting and the paired fine-tuning gain."""
    locs = [f"tokens_after_block{loc}" for loc in args.reduction_loc]
    keys = ["method", "linkage", "keep_rate"]
    out = []
    for key, part in frame.groupby(keys, sort=False):
        row = dict(zip(keys, key))
        first = part.iloc[0]
        row.update({c: first[c] for c in [*locs, "final_tokens", "gflops"]}, capped=bool(first["note"]))
        for setting in SETTINGS:
            v = part[part.setting == setting].set_index("seed").top1
            row[f"{setting}_mean"], row[f"{setting}_std"], row[f"{setting}_n"] = v.mean(), v.std(), v.count()
            row[setting] = v
        gain = (row["fine-tuned"] - row["off-the-shelf"]).dropna()
        row["gain"] = gain
        out.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    summary = pd.DataFrame(out)
    summary["_order"] = [order.get(m if not lk else f"{m}_{lk}", 99) for m, lk in zip(summary.method, summary.linkage)]
    return summary.sort_values(["keep_rate", "_order"], ascending=[False, True]).drop(columns="_order")


def markdown_table(frame: pd.DataFrame, args: argparse.Namespace) -> str:
    """Rows: (keep rate, method); columns: cost, Top-1 off the shelf / fine-tuned (mean ± std over the seeds)
    and the fine-tuning gain (fine-tuned − off the shelf of the same seed, mean ± std)."""
    summary = summarize(frame, args)
    locs = [f"tokens_after_block{loc}" for loc in args.reduction_loc]
    seeds = sorted(set(frame.seed))
    lines = [f"| keep rate | method | tokens after blocks {' / '.join(map(str, args.reduction_loc))} | GFLOPs "
             "| Top-1 off the shelf | Top-1 fine-tuned | fine-tuning gain |",
             "|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        tokens = " / ".join(str(int(r[c])) for c in locs) + (" *" if r.capped else "")
        lines.append(f"| {r.keep_rate:g} | {display_name(r.method, r.linkage)} | {tokens} | {r.gflops:.4f} "
                     f"| {_mean_std(r['off-the-shelf'])} | {_mean_std(r['fine-tuned'])} | "
                     f"{_mean_std(r.gain) if len(r.gain) else 'n/a'} |")
    text = "\n".join(lines) + "\n"
    text += (f"\nTop-1 in % on the 360-image val split (one image = 0.28 points); mean ± sample standard deviation "
             f"over {len(seeds)} seed(s) ({' '.join(map(str, seeds))}), each seed with its own base model. "
             "The gain is paired by seed. Tokens are patch tokens (the class token is not counted); GFLOPs per "
             "image are counted on the reduced model (multiply-add = 2 FLOPs).\n")
    if summary.capped.any():
        text += ("\n\\* ToMe removes at most half the tokens per location, so at this keep rate it keeps more "
                 "tokens (and costs more GFLOPs) than asked: compare it by GFLOPs, not by keep rate.\n")
    return text


def plot(frame: pd.DataFrame, args: argparse.Namespace, path: Path) -> None:
    summary = summarize(frame, args)
    points = []
    for _, r in summary.iterrows():
        for setting in SETTINGS:
            if r[f"{setting}_n"]:
                name = display_name(r.method, r.linkage)
                panel = "off the shelf" if setting == "off-the-shelf" else f"fine-tuned ({args.finetune_epochs} epochs)"
                points.append({"setting": panel, "gflops": r.gflops, "top1": r[f"{setting}_mean"],
                               "std": r[f"{setting}_std"], "line": name, "method": r.method,
                               "marker": r.linkage or r.method})
    seeds = sorted(set(frame.seed))
    # one colour per method (none, ToMe, ATC); ATC's linkages by marker and line style
    errorbar_plot(points, x="gflops", y="top1", yerr="std", panel="setting", color="method", marker="marker",
                  label="line", path=path, xlabel="GFLOPs per image", ylabel="Top-1 (%)",
                  title=f"Digits: Top-1 vs cost, mean ± std over {len(seeds)} seed(s) "
                        f"(points: keep rates {', '.join(f'{k:g}' for k in sorted(args.keep_rates))})")


def main(args: argparse.Namespace) -> pd.DataFrame:
    t_start = time.time()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds has repeated values {args.seeds}; give each seed once.")
    validate_reduction(args.keep_rates, args.reduction_loc, None, args.depth)
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = the defaults), got {args.threads}.")
    if args.threads:
        set_threads(args.threads)
    with warnings.catch_warnings():
        # ToMe's cap at half the tokens per location is expected here and marked in the table ('*', the "capped"
        # column); its warning would be the first line a new user sees and reads like a failure
        warnings.filterwarnings("ignore", message="tome cannot remove the requested number of tokens")
        return _run(args, t_start)


def _run(args: argparse.Namespace, t_start: float) -> pd.DataFrame:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows: list[dict[str, Any]] = []
    if csv_path.is_file():
        rows = pd.read_csv(csv_path).fillna({"linkage": "", "note": ""}).to_dict("records")
    done = {(int(r["seed"]), r["method"], r["linkage"], float(r["keep_rate"]), r["setting"]) for r in rows}

    jobs = ([("none", 1.0)] if "none" in args.methods else []) + [
        (m, kr) for m in args.methods if m != "none" for kr in args.keep_rates]
    # Build every configuration once up front: fails early on a method the model registry cannot build, and
    # measures the cost of each (the same for every seed).
    costs = {}
    for name, kr in jobs:
        costs[name, kr] = profile(build(args, name, kr), args)

    for si, seed in enumerate(args.seeds):
        seed_everything(seed)
        train_loader, val_loader, _ = build_loaders(
            "digits", None, args.input_size, args.batch_size, seed=seed, aa=None, reprob=0.0, color_jitter=0.0,
            no_aug=True)
        loaders = (train_loader, val_loader)
        todo = [(name, kr, setting) for name, kr in jobs for setting in SETTINGS
                if (seed, *split_method(name), float(kr), setting) not in done]
        if not todo:
            continue
        base_dir = out / f"seed{seed}" / "base"
        seed_everything(seed)
        base = build(args, "none", 1.0)
        params = sum(p.numel() for p in base.parameters()) / 1e6
        print(f"[seed {seed}, {si + 1}/{len(args.seeds)}] base ViT ({params:.2f} M params, "
              f"{(args.input_size // args.patch_size) ** 2} tokens): training {args.epochs} epochs -> {base_dir}")
        train(base, base_dir, args.epochs, args.lr, args.warmup_epochs, loaders)
        base_source = f"base checkpoint '{base_dir / 'checkpoint.pth'}'"
        base_state = state_dict_from_checkpoint(read_checkpoint(base_dir / "checkpoint.pth"), source=base_source)

        bar = tqdm(todo, desc=f"seed {seed}: configurations", dynamic_ncols=True)
        for name, kr, setting in bar:
            bar.set_postfix(method=name, keep_rate=kr, setting=setting)
            method, linkage = split_method(name)
            cost = costs[name, kr]
            row: dict[str, Any] = {"seed": seed, "method": method, "linkage": linkage, "keep_rate": kr,
                                   "setting": setting, **{k: v for k, v in cost.items() if k != "capped"},
                                   "note": "ToMe capped at half the tokens per location" if cost["capped"] else ""}
            seed_everything(seed)
            model = build(args, name, kr)
            load_state_dict_checked(model, base_state, base_source)
            last: dict[str, Any] = {}
            if setting == "fine-tuned":
                ft_dir = out / f"seed{seed}" / "finetune" / f"{name}_kr{kr:g}"
                seed_everything(seed)
                last = train(model, ft_dir, args.finetune_epochs, args.finetune_lr, args.finetune_warmup_epochs,
                             loaders)
            # the fine-tune's last epoch was evaluated on the same split by fit: no second pass
            res = ({"top1": last["val_top1"], "top5": last["val_top5"]} if "val_top1" in last
                   else evaluate(model, val_loader, torch.device("cpu"), progress=False))
            row.update(top1=round(res["top1"], 2), top5=round(res["top5"], 2))
            rows.append(row)
            write_csv(rows, csv_path)  # after every row: an interrupted run loses nothing
            if setting == "fine-tuned":
                for ckpt in ft_dir.glob("*.pth"):  # 9 MB each x configurations x seeds; the row is the result
                    ckpt.unlink()

    frame = pd.DataFrame(rows)
    frame = frame[frame.seed.isin(args.seeds)]
    table = markdown_table(frame, args)
    atomic_write_text(
        f"# ATC on digits ({args.input_size}px, patch {args.patch_size}, depth {args.depth}, width {args.embed_dim}; "
        f"reduction after blocks {' '.join(map(str, args.reduction_loc))}; fine-tune {args.finetune_epochs} "
        f"epoch(s), peak lr {args.finetune_lr:g} after {args.finetune_warmup_epochs} warm-up epoch(s))\n\n" + table, out / "results.md")
    plot(frame, args, out / "results.png")
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
