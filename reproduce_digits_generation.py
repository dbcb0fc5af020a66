#!/usr/bin/env python
"""A miniature of the paper's Stable Diffusion table: a small class-conditional diffusion model trained on
scikit-learn's bundled digits, sampled with no merging, ToMe-SD and ATC at several merge ratios.

For every seed:
1. Train a small class-conditional denoiser on the digits (a diffusers UNet2DConditionModel whose full-resolution
   blocks hold transformer blocks, as Stable Diffusion's; DDPM training), cached in --output_dir.
2. Sample the same class-balanced set of images from the same initial noise (DDIM, eta 0) with no merging, then
   with every method and ratio (atc.patch.diffusers on the trained UNet; ToMe-SD's random destinations reseeded
   before every run).
3. Score every setting: paired deviation from the unmerged sample of the same noise and class (MSE and PSNR in
   [0, 1] pixel space), class accuracy (an MLP trained here on the real digits labels the samples), FID in that
   MLP's feature space against the held-out real digits, sampling seconds per image and self-attention tokens
   per transformer block.
4. Write results.csv (one row per seed and setting), results.md (mean +- std over the seeds), results.png
   (quality against sampling time) and samples.png (one image per class for every setting, first seed).

Resumable: trained denoisers are cached (atomic checkpoints; an interrupted training continues), finished rows in
results.csv are skipped. The defaults (2 seeds) take about 13 minutes on 2 CPU cores (docs/stable_diffusion.md):

    python reproduce_digits_generation.py --output_dir results/digits_generation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

import atc.patch
from atc.checkpoint import read_checkpoint
from atc.cli import ConfigError, run_cli
from atc.cluster import LINKAGES
from atc.patch.diffusion import METHODS as PATCH_METHODS
from atc.patch.diffusion import reseed
from atc.sd import digits_diffusion as dd
from atc.utils import atomic_save, atomic_write_text, errorbar_plot, seed_everything, set_threads

#: ``--methods`` choices: no merging, then every method of the diffusers patch, ATC once per linkage.
METHODS = ("none", *(m for m in PATCH_METHODS if m != "atc"), *(f"atc_{lk}" for lk in LINKAGES))
KEY = ["seed", "method", "linkage", "ratio", "options"]
COLUMNS = ("seed", "model", *KEY[1:], "images", "mse", "psnr_db", "class_acc", "fid", "s_per_image")


@dataclass(frozen=True)
class Setting:
    """One sampling run: ``method`` (``none``, ``real`` = the real digits, or a patch method), its ``linkage``
    (ATC), the merge ``ratio`` (fraction of tokens removed) and ``options``, extra ``atc.patch.diffusers`` keyword
    arguments as ``"key=value,key=value"`` (the fast-diffusion options; ``""``: none)."""

    method: str
    linkage: str = ""
    ratio: float = 0.0
    options: str = ""

    @property
    def label(self) -> str:
        name = {"none": "no merging", "tome": "ToMe-SD", "real": "real digits"}.get(self.method, f"ATC {self.linkage}")
        return name + (f" [{self.options}]" if self.options else "")

    @property
    def file_stem(self) -> str:
        extra = "_" + self.options.replace("=", "-").replace(",", "_") if self.options else ""
        return f"{self.method}{'_' + self.linkage if self.linkage else ''}_r{self.ratio:g}{extra}"

    def key(self, seed: int) -> tuple:
        return (seed, self.method, self.linkage, float(self.ratio), self.options)

    def patch_kwargs(self, args: argparse.Namespace, seed: int) -> dict[str, Any]:
        """Keyword arguments for ``atc.patch.diffusers`` (empty for no merging)."""
        if self.method in ("none", "real"):
            return {}
        kwargs: dict[str, Any] = {"method": self.method, "ratio": self.ratio, "max_downsample": args.max_downsample,
                                  "seed": seed}
        if self.method == "atc":
            kwargs["linkage"] = self.linkage
        return {**kwargs, **parse_options(self.options)}


def parse_options(text: str) -> dict[str, Any]:
    """``"reuse_steps=2,plan=group,tile=[4,4]"`` -> ``{"reuse_steps": 2, "plan": "group", "tile": [4, 4]}``
    (values parsed as JSON if they can be: numbers, true/false, lists; commas inside brackets or quotes belong to
    the value)."""
    out: dict[str, Any] = {}
    items, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0 and not quoted:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    for item in filter(None, (s.strip() for s in items)):
        if "=" not in item:
            raise ConfigError(f"--patch_options expects key=value pairs separated by commas, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("reproduce_digits_generation.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default=None,
                   help="where results, cached denoisers and samples go (default: results/digits_generation, "
                        "with --quick results/digits_generation_quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="one denoiser, noise set, judge and table row per seed; results.md reports mean +- std")
    p.add_argument("--quick", action="store_true",
                   help="smoke run in about a minute: seed 0, a tiny denoiser trained briefly, 2 images per class, "
                        "4 sampling steps, ratio 0.5 (overrides those flags; numbers are meaningless)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads and ATC clustering threads (atc.cluster.set_num_threads); 0 = the defaults "
                        "(torch: every core, clustering: 1). Use 1 on a machine whose cores are busy with other work")
    g = p.add_argument_group("denoiser")
    g.add_argument("--model", default="unet", choices=list(dd.DENOISERS),
                   help="unet: diffusers UNet2DConditionModel, class as a one-token cross-attention context; dit: "
                        "DiTTransformer2DModel (class labels native; every block patched)")
    g.add_argument("--resolution", type=int, default=8,
                   help="image side: 8 = the digits' own grid (64 tokens at full resolution); 16 = upsampled "
                        "(256 tokens, about 5x the cost of a training step)")
    g.add_argument("--widths", type=int, nargs="+", default=[32, 64],
                   help="UNet channels per level (the first level holds the full-resolution transformer blocks); "
                        "DiT: the first value is its width")
    g.add_argument("--depth", type=int, default=1, help="UNet layers per block / DiT blocks")
    g.add_argument("--head_dim", type=int, default=8, help="attention head width")
    g.add_argument("--context_dim", type=int, default=64, help="UNet: width of the one-token class context")
    g.add_argument("--patch_size", type=int, default=1, help="DiT: patch side (tokens = (resolution/patch)^2)")
    g = p.add_argument_group("training (DDPM, epsilon prediction, AdamW, warm-up then cosine)")
    g.add_argument("--train_steps", type=int, default=800, help="optimiser steps per seed")
    g.add_argument("--batch_size", type=int, default=128, help="training batch size")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--warmup_steps", type=int, default=50, help="linear warm-up steps")
    g.add_argument("--label_dropout", type=float, default=0.1,
                   help="fraction of training labels replaced by the null class (needed for --guidance_scale != 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"settings to sample: {', '.join(METHODS)}")
    g.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="merge ratios: fraction of the tokens removed in every merged block (ToMe-SD: at most 0.75)")
    g.add_argument("--max_downsample", type=int, default=1,
                   help="merge blocks whose downsampling is at most this (1 = full resolution only)")
    g.add_argument("--patch_options", nargs="+", default=[""], metavar="K=V[,K=V]",
                   help="extra atc.patch.diffusers keyword arguments, one set per value, each sampled for every "
                        "method and ratio ('' = none), e.g. '' 'merge_mlp=true'")
    g.add_argument("--per_class", type=int, default=50, help="images sampled per class (10 classes)")
    g.add_argument("--sampling_steps", type=int, default=20, help="DDIM steps")
    g.add_argument("--guidance_scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = none: conditional prediction only)")
    g.add_argument("--sample_batch", type=int, default=0, help="images per sampling batch (0 = all at once)")
    g.add_argument("--judge_hidden", type=int, default=64, help="hidden units of the judge MLP (its FID features)")
    return p


QUICK = {"seeds": [0], "widths": [16, 32], "train_steps": 30, "batch_size": 64, "warmup_steps": 5, "per_class": 2,
         "sampling_steps": 4, "ratios": [0.5]}


def build_settings(args: argparse.Namespace) -> list[Setting]:
    settings = [Setting("none")] if "none" in args.methods else []
    for options in args.patch_options:
        for name in args.methods:
            if name == "none":
                continue
            method, _, linkage = name.partition("_")
            settings += [Setting(method, linkage, float(r), options) for r in args.ratios]
    return settings


def validate(args: argparse.Namespace, settings: list[Setting]) -> None:
    """Fail before any training on a flag the run cannot use, naming the flag."""
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds has repeated values {args.seeds}; give each seed once.")
    for flag in ("train_steps", "batch_size", "per_class", "sampling_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if not 0 <= args.label_dropout < 1:
        raise ConfigError(f"--label_dropout must be in [0, 1), got {args.label_dropout}.")
    if args.guidance_scale != 1 and args.label_dropout == 0 and args.model == "unet":
        raise ConfigError("--guidance_scale needs a model trained with a null class: set --label_dropout > 0.")
    if args.sample_batch < 0 or args.sample_batch % 2:
        raise ConfigError(f"--sample_batch must be 0 (all at once) or even (ToMe-SD's random destinations switch off "
                          f"for odd batches), got {args.sample_batch}.")
    model = dd.build_digits_denoiser(denoiser_config(args))  # a bad --model / --widths / --patch_size fails here
    # Patch an untrained model once per setting: a ratio a method cannot reach (ToMe-SD: at most 0.75), an
    # unknown --patch_options key or value fails now, not after the training.
    for s in settings:
        kwargs = s.patch_kwargs(args, 0)
        if not kwargs:
            continue
        try:
            atc.patch.diffusers(model.backbone, **kwargs)
        except (ValueError, TypeError) as exc:
            flag = f"--patch_options {s.options!r}" if s.options else f"--ratios {s.ratio:g}"
            raise ConfigError(f"{s.label} at ratio {s.ratio:g} ({flag}): {exc}") from None
        finally:
            atc.patch.remove(model.backbone)


#: Flags that change the numbers of a row: a folder continues only with the same values (run.json).
RESULT_FLAGS = ("model", "resolution", "widths", "depth", "head_dim", "context_dim", "patch_size", "train_steps",
                "batch_size", "lr", "warmup_steps", "label_dropout", "max_downsample", "per_class", "sampling_steps",
                "guidance_scale", "sample_batch", "judge_hidden")


def check_run_file(args: argparse.Namespace, out: Path) -> None:
    """Write ``run.json`` (the flags behind the rows) on the first run; refuse to continue a folder whose rows were
    made with other values, naming them."""
    current = {k: getattr(args, k) for k in RESULT_FLAGS}
    path = out / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [k for k in RESULT_FLAGS if saved.get(k) != current[k]]
        if diff:
            raise ConfigError(
                f"{out} holds results made with other settings ("
                + ", ".join(f"--{k} {saved.get(k)} there, {current[k]} now" for k in diff)
                + "): use another --output_dir, or the same flags to continue it")
        return
    atomic_write_text(json.dumps(current, indent=1) + "\n", path)


def denoiser_config(args: argparse.Namespace) -> dd.DenoiserConfig:
    return dd.DenoiserConfig(model=args.model, resolution=args.resolution, widths=tuple(args.widths),
                             depth=args.depth, head_dim=args.head_dim, context_dim=args.context_dim,
                             patch_size=args.patch_size)


def train_config(args: argparse.Namespace, seed: int) -> dd.TrainConfig:
    return dd.TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup_steps,
                          label_dropout=0.0 if args.model == "dit" else args.label_dropout, seed=seed)


def sample_setting(model: torch.nn.Module, setting: Setting, args: argparse.Namespace, seed: int,
                   noise: torch.Tensor, classes: torch.Tensor, tcfg: dd.TrainConfig) -> dict[str, Any]:
    """Patch (if merging), sample, unpatch. Returns the samples, seconds per image and self-attention tokens per
    transformer block."""
    kwargs = setting.patch_kwargs(args, seed)
    backbone = model.backbone
    with torch.no_grad():  # warm-up (first-call costs, numba compiling the clustering) outside the timing
        if kwargs:
            atc.patch.diffusers(backbone, **kwargs)
        try:
            model(noise[:2], torch.tensor(0), classes[:2])
        finally:
            atc.patch.remove(backbone)
    if kwargs:
        # patched afresh, so nothing the warm-up left in the patch's state reaches the samples; ToMe-SD's random
        # destinations: every run starts its generator from the same seed
        atc.patch.diffusers(backbone, **kwargs)
        reseed(backbone, seed)
    try:
        with dd.attention_tokens(backbone) as tokens:
            start = time.perf_counter()
            images = dd.sample_images(model, noise, classes, tcfg, steps=args.sampling_steps,
                                      guidance_scale=args.guidance_scale, batch_size=args.sample_batch or None)
            seconds = time.perf_counter() - start
    finally:
        atc.patch.remove(backbone)
    return {"images": images, "s_per_image": seconds / len(noise), "tokens": dict(tokens)}


def run_seed(args: argparse.Namespace, seed: int, settings: list[Setting], rows: list[dict[str, Any]],
             done: set[tuple], out: Path, csv_path: Path) -> None:
    todo = [s for s in settings if s.key(seed) not in done]
    real = Setting("real")
    if not todo and real.key(seed) in done:
        return
    seed_dir = out / f"seed{seed}"
    mcfg, tcfg = denoiser_config(args), train_config(args, seed)
    seed_everything(seed)
    model = dd.build_digits_denoiser(mcfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    tqdm.write(f"[seed {seed}] {args.model} denoiser ({params:.2f} M parameters, {args.resolution}x{args.resolution}): "
               f"{args.train_steps} steps at batch {args.batch_size} -> {seed_dir / 'denoiser.pth'}")
    train_images, train_labels = dd.digits_images("train", args.resolution)
    info = dd.train_denoiser(model, train_images, train_labels, tcfg, seed_dir / "denoiser.pth",
                             meta={"model": mcfg.to_dict()}, log=tqdm.write)
    tqdm.write(f"[seed {seed}] denoiser: final loss {info['loss']:.4f}, trained in {info['seconds']:.0f} s")

    judge = dd.DigitsJudge.fit(seed=seed, hidden=args.judge_hidden)
    reference, _ = dd.digits_images("val", args.resolution)  # held out from the denoiser and the judge
    num = args.per_class * dd.NUM_CLASSES
    classes = dd.balanced_classes(args.per_class)
    noise = dd.initial_noise(num, args.resolution, seed)
    base = {"seed": seed, "model": args.model, "images": num}

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        done.add(tuple(row[k] for k in KEY))
        write_results(rows, csv_path)  # after every row: an interrupted run loses nothing

    if real.key(seed) not in done:
        # The references of the two quality metrics. Class accuracy: the judge on the held-out real digits (it
        # never saw them), the most a sample set can expect. FID: real training digits (what the denoiser learnt;
        # as many as the samples, every class equally often) against the held-out ones, the floor.
        picks = torch.cat([torch.nonzero(train_labels == c)[:args.per_class, 0] for c in range(dd.NUM_CLASSES)])
        add({**base, **dict(zip(KEY[1:], (real.method, "", 0.0, ""))), "images": len(picks),
             "class_acc": round(100 * judge.val_accuracy, 2),
             "fid": round(dd.judge_fid(judge, reference, train_images[picks]), 4), "note": ""})

    samples_dir = seed_dir / "samples"
    unmerged_path = samples_dir / f"{Setting('none').file_stem}.pt"
    unmerged = None
    if unmerged_path.is_file():
        unmerged = read_checkpoint(unmerged_path, "unmerged samples")
        if unmerged.shape != noise.shape:
            unmerged = None  # another --per_class or --resolution: sample again

    with torch.no_grad(), dd.attention_tokens(model.backbone) as unmerged_tokens:
        model(noise[:2], torch.tensor(0), classes[:2])
    blocks_file = out / "blocks.json"  # the transformer blocks behind the tokens_block<i> columns, for the report
    if not blocks_file.is_file():
        atomic_write_text(json.dumps(list(unmerged_tokens)) + "\n", blocks_file)

    def kwargs_merge(setting: Setting) -> bool:
        """Should this setting remove tokens somewhere? (A patch that merges nothing is marked in the row.)"""
        return setting.method not in ("none", "real") and any(int(t * setting.ratio) > 0
                                                              for t in unmerged_tokens.values())

    if Setting("none") not in todo and unmerged is None and todo:
        todo.insert(0, Setting("none"))  # the paired reference of the merged settings
    bar = tqdm(todo, desc=f"seed {seed}: sampling settings", dynamic_ncols=True)
    for setting in bar:
        bar.set_postfix_str(f"{setting.label} r={setting.ratio:g}")
        result = sample_setting(model, setting, args, seed, noise, classes, tcfg)
        images = result["images"]
        atomic_save(images, samples_dir / f"{setting.file_stem}.pt")
        if setting.method == "none":
            unmerged = images
        mse = dd.paired_mse(images, unmerged)
        row = {**base, **dict(zip(KEY[1:], (setting.method, setting.linkage, setting.ratio, setting.options))),
               "mse": mse, "psnr_db": round(dd.psnr(mse), 3),
               "class_acc": round(100 * dd.class_accuracy(judge, images, classes), 2),
               "fid": round(dd.judge_fid(judge, reference, images), 4),
               "s_per_image": round(result["s_per_image"], 5),
               **{f"tokens_block{i}": t for i, t in enumerate(result["tokens"].values())},
               "note": "nothing merged" if kwargs_merge(setting) and result["tokens"] == unmerged_tokens else ""}
        if setting.key(seed) not in done:
            add(row)


# ------------------------------------------------------------------------------------------------------ report
def _fmt(x: float, digits: int) -> str:
    return f"{x + 0.0:.{digits}f}"


def mean_std(values: pd.Series, digits: int = 2) -> str:
    values = values.dropna()
    if not len(values):
        return "n/a"
    if math.isinf(values.mean()):
        return "∞"
    if len(values) == 1:
        return _fmt(values.iloc[0], digits)
    return f"{_fmt(values.mean(), digits)} ± {_fmt(values.std(), digits)}"


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (seeds pooled), in the order no merging, then per options, ratio, method."""
    order = {m: i for i, m in enumerate(("real", *METHODS))}
    frame = frame.assign(_order=[order.get(m if not lk else f"{m}_{lk}", 99)
                                 for m, lk in zip(frame.method, frame.linkage)])
    out = []
    for key, part in frame.groupby(["options", "ratio", "_order", "method", "linkage"], sort=True):
        out.append({"options": key[0], "ratio": key[1], "method": key[3], "linkage": key[4], "part": part})
    return pd.DataFrame(out)


def markdown_table(frame: pd.DataFrame, args: argparse.Namespace, blocks: list[str]) -> str:
    token_cols = sorted((c for c in frame.columns if c.startswith("tokens_block")), key=lambda c: int(c[12:]))
    seeds = sorted(set(frame.seed))
    lines = ["| setting | ratio | self-attention tokens per block | paired MSE ×1000 | PSNR (dB) | class accuracy (%) "
             "| FID (judge features) | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in summarize(frame).iterrows():
        part = r.part
        s = Setting(r.method, r.linkage, r.ratio, r.options)
        tokens = " / ".join(str(int(part[c].iloc[0])) for c in token_cols if pd.notna(part[c].iloc[0])) or "—"
        if r.method == "real":
            lines.append(f"| real digits | — | — | — | — "
                         f"| {mean_std(part.class_acc)} | {mean_std(part.fid)} | — |")
            continue
        note = " (nothing merged)" if (part.note == "nothing merged").any() else ""
        lines.append(f"| {s.label}{note} | {r.ratio:g} | {tokens} | {mean_std(part.mse * 1000, 3)} "
                     f"| {mean_std(part.psnr_db, 1)} | {mean_std(part.class_acc)} | {mean_std(part.fid)} "
                     f"| {mean_std(part.s_per_image * 1000, 1)} ms |")
    text = "\n".join(lines) + "\n"
    text += (f"\nMean ± sample standard deviation over {len(seeds)} seed(s) ({' '.join(map(str, seeds))}); each seed "
             f"trains its own denoiser and judge and draws its own noise. {args.per_class * dd.NUM_CLASSES} images "
             f"per setting ({args.per_class} per class), {args.sampling_steps} DDIM steps, guidance scale "
             f"{args.guidance_scale:g}. Paired MSE: per-image mean squared difference from the unmerged sample of the "
             "same noise and class, pixels in [0, 1] (PSNR from the mean MSE). Class accuracy: the fraction the "
             "judge (an MLP trained on the real training digits) labels as the requested class. FID: Fréchet "
             "distance in the judge's hidden-layer features against the 360 held-out real digits; the real-digits "
             "row gives the judge's accuracy on the held-out digits and the FID of as many real training digits as "
             "there are samples (reference values for both scores). Tokens: self-attention tokens of each "
             f"transformer block ({', '.join(b.replace('.transformer_blocks.', '.') for b in blocks)}). s / image: sampling wall time per image (the whole batch "
             "sampled at once, divided by its size).\n")
    return text


def plot(frame: pd.DataFrame, path: Path) -> None:
    points = []
    panels = (("class_acc", "class accuracy (%)"), ("fid", "FID (judge features)"), ("mse", "paired MSE ×1000"))
    for _, r in summarize(frame[frame.method != "real"]).iterrows():
        part = r.part
        s = Setting(r.method, r.linkage, r.ratio, r.options)
        for column, panel in panels:
            values = part[column] * (1000 if column == "mse" else 1)
            points.append({"panel": panel, "x": part.s_per_image.mean() * 1000, "y": values.mean(),
                           "std": values.std() if len(values) > 1 else 0.0, "line": s.label, "ratio": r.ratio,
                           "method": r.method, "marker": r.linkage or r.method})
    seeds = sorted(set(frame.seed))
    errorbar_plot(points, x="x", y="y", yerr="std", panel="panel", color="method", marker="marker", label="line",
                  path=path, xlabel="sampling ms per image", sharey=False, order="ratio",
                  title=f"Digits generation: quality vs sampling time, mean ± std over {len(seeds)} seed(s) "
                        f"(points: merge ratios {', '.join(f'{r:g}' for r in sorted(set(frame.ratio)) if r)}, "
                        "joined in that order)")


def sample_grid(out: Path, seed: int, settings: list[Setting], path: Path) -> None:
    """One row per setting (the first image of every class), from the cached samples of ``seed``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(s, out / f"seed{seed}" / "samples" / f"{s.file_stem}.pt") for s in settings]
    found = [(s, p) for s, p in found if p.is_file()]
    if not found:
        return
    fig, axes = plt.subplots(len(found), 1, figsize=(6, 0.75 * len(found) + 0.3), squeeze=False)
    for ax, (s, p) in zip(axes[:, 0], found):
        images = dd.to_unit(read_checkpoint(p, "samples")[:dd.NUM_CLASSES])[:, 0]  # classes 0..9
        ax.imshow(torch.cat(list(images), dim=1).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{s.label}\n{'' if s.method == 'none' else f'r={s.ratio:g}'}", rotation=0, ha="right",
                      va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """results.csv (atomically): the key and metric columns first, then tokens per block, then the note."""
    frame = pd.DataFrame(rows)
    tokens = sorted((c for c in frame.columns if c.startswith("tokens_block")), key=lambda c: int(c[12:]))
    frame = frame.reindex(columns=[*COLUMNS, *tokens, "note"])
    frame[tokens] = frame[tokens].astype("Int64")  # the real-digits rows have none
    atomic_write_text(frame.to_csv(index=False), path)


def read_results(path: Path) -> pd.DataFrame:
    """results.csv with its text columns as strings ("" where empty) and missing numbers as NaN."""
    text = {"method": str, "linkage": str, "options": str, "note": str, "model": str}
    return pd.read_csv(path, dtype=text).fillna({k: "" for k in text})


def main(args: argparse.Namespace) -> pd.DataFrame:
    t_start = time.time()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    settings = build_settings(args)
    validate(args, settings)
    if args.threads:
        set_threads(args.threads)
    out = Path(args.output_dir or ("results/digits_generation_quick" if args.quick else "results/digits_generation"))
    out.mkdir(parents=True, exist_ok=True)
    check_run_file(args, out)
    csv_path = out / "results.csv"
    rows: list[dict[str, Any]] = []
    if csv_path.is_file():
        rows = read_results(csv_path).to_dict("records")
    done = {(int(r["seed"]), r["method"], r["linkage"], float(r["ratio"]), r["options"]) for r in rows}
    for seed in args.seeds:
        run_seed(args, seed, settings, rows, done, out, csv_path)

    frame = pd.DataFrame(rows)
    wanted = {s.key(seed) for seed in args.seeds for s in [Setting("real"), *settings]}
    frame = frame[[tuple(k) in wanted for k in frame[KEY].itertuples(index=False, name=None)]]
    blocks = json.loads((out / "blocks.json").read_text()) if (out / "blocks.json").is_file() else []
    table = markdown_table(frame, args, blocks)
    atomic_write_text(
        f"# Token merging in a digits diffusion model ({args.model}, {args.resolution}x{args.resolution}, widths "
        f"{' / '.join(map(str, args.widths))}, {args.train_steps} training steps at batch {args.batch_size}; "
        f"merging blocks with downsampling <= {args.max_downsample})\n\n" + table, out / "results.md")
    if (frame.method != "real").any():
        plot(frame, out / "results.png")
        sample_grid(out, args.seeds[0], settings, out / "samples.png")
    print(table)
    print(f"wrote {csv_path}, {out / 'results.md'}, {out / 'results.png'}, {out / 'samples.png'} in "
          f"{time.time() - t_start:.0f} s")
    return frame


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
