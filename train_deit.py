#!/usr/bin/env python
"""Fine-tune (or train) a DeiT/ViT with token reduction (ATC, ToMe, K-Medoids, DPC-KNN) — DeiT/timm recipe.

Example (the built-in digits data, CPU, a couple of minutes):

    python train_deit.py --dataset digits --model atc_tiny_patch16_224 --input-size 112 --reduction_loc 3 6 9 \
        --keep_rate 0.7 --linkage average --batch-size 64 --mixup 0 --cutmix 0 --num_workers 0 --epochs 2 \
        --output_dir runs/digits_atc

Run again with a larger ``--epochs`` to continue (``--resume output_dir/checkpoint.pth``, or automatically from
``output_dir``). Multi-GPU / multi-process: ``torchrun --nproc_per_node N train_deit.py ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from atc import distributed as D
from atc.checkpoint import find_resume, load_checkpoint, load_for_resume
from atc.cli import ConfigError, parse_model_kwargs, run_cli
from atc.cluster import LINKAGES
from atc.data import DATASETS, MULTILABEL_DATASETS
from atc.data import build_loaders as data_build_loaders
from atc.engine import FitConfig, amp_dtype_for, count_parameters, evaluate, fit
from atc.models import build_classifier, is_reduction_model, reduction_settings, validate_reduction
from atc.tracking import add_wandb_arguments, require_wandb


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("train_deit.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("batch and schedule length")
    g.add_argument("--batch-size", "--batch_size", type=int, default=64, help="per-process batch size")
    g.add_argument("--epochs", type=int, default=300, help="total number of epochs")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr_batch_normalizer", type=float, default=512.0,
                   help="lr <- lr * batch * grad_accum_steps * world_size / this (unless --unscale-lr)")
    g.add_argument("--unscale-lr", action="store_true", help="use --lr as given, without batch scaling")

    g = p.add_argument_group("model and token reduction")
    g.add_argument("--model", default="deit_small_patch16_224",
                   help="timm name: atc_/tome_/kmedoids_/dpcknn_{tiny,small,base}_patch16_224 or deit_*/vit_*")
    g.add_argument("--model-kwargs", "--model_kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs, e.g. embed_dim=64 depth=4 num_heads=2 patch_size=8")
    g.add_argument("--input-size", "--input_size", type=int, default=224, help="image side in pixels")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", "--drop_path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--reduction_loc", type=int, nargs="+", default=[3, 6, 9],
                   help="0-indexed blocks after whose attention tokens are reduced")
    g.add_argument("--reduction_ratio", "--keep_rate", dest="keep_rate", type=float, nargs="+", default=[0.9],
                   help="keep rate in (0, 1] (the published flag is --reduction_ratio; it means the fraction kept): "
                        "after location i, int(N * kr^(i+1)) tokens remain; one value per location is also accepted")
    g.add_argument("--linkage", default=None,
                   help=f"ATC linkage: {'|'.join(sorted(LINKAGES))} (default: the model's own, complete, as published)")
    g.add_argument("--proportional_attn", action=argparse.BooleanOptionalAction, default=None,
                   help="add log(token size) to attention logits; default: the model's own (on for atc_/tome_, off "
                        "for kmedoids_/dpcknn_, as the published models). The published script turned it off unless "
                        "the flag was given: pass --no-proportional_attn for that")

    g = p.add_argument_group("optimiser (timm create_optimizer_v2)")
    g.add_argument("--opt", default="adamw", help="optimiser name, e.g. adamw, sgd, lamb")
    g.add_argument("--opt-eps", "--opt_eps", type=float, default=1e-8, help="optimiser epsilon")
    g.add_argument("--opt-betas", "--opt_betas", type=float, nargs="+", default=None, help="optimiser betas")
    g.add_argument("--clip-grad", "--clip_grad", type=float, default=None, help="max gradient norm (off if unset)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", "--weight_decay", type=float, default=0.05, help="weight decay")

    g = p.add_argument_group("learning-rate schedule (timm create_scheduler_v2)")
    g.add_argument("--sched", default="cosine", help="cosine, step, multistep, plateau, poly, tanh")
    g.add_argument("--lr", type=float, default=5e-4, help="base learning rate (before batch scaling)")
    g.add_argument("--warmup-lr", "--warmup_lr", type=float, default=1e-6, help="lr at the start of warm-up")
    g.add_argument("--min-lr", "--min_lr", type=float, default=1e-5, help="lower bound of the schedule")
    g.add_argument("--warmup-epochs", "--warmup_epochs", type=int, default=5, help="warm-up epochs")
    g.add_argument("--cooldown-epochs", "--cooldown_epochs", type=int, default=0, help="epochs at min-lr at the end")
    g.add_argument("--decay-epochs", "--decay_epochs", type=float, default=30, help="step schedule period")
    g.add_argument("--decay-rate", "--decay_rate", type=float, default=0.1, help="step schedule factor")
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau schedule patience")
    g.add_argument("--sched_in_steps", action="store_true", help="update the lr every optimiser step, not epoch")

    g = p.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=float, default=0.3, help="colour jitter strength")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none' to disable)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train-interpolation", default="bicubic", help="random, bilinear or bicubic")
    g.add_argument("--reprob", type=float, default=0.25, help="random-erasing probability")
    g.add_argument("--remode", default="pixel", help="random-erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random-erasing count")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation (resize + centre crop)")
    g.add_argument("--crop-pct", type=float, default=None, help="eval crop fraction (default 0.875; 1.0 digits)")
    g.add_argument("--repeated-aug", dest="repeated_aug", action="store_true", default=True,
                   help="repeated augmentation sampler (timm RepeatAugSampler, 3 repeats)")
    g.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false", help="plain shuffling sampler")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (default 0.8; 0 for multi-label)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (default 1.0; 0 for multi-label)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"], help="mixup per batch, pair or element")

    g = p.add_argument_group("EMA")
    g.add_argument("--model-ema", dest="model_ema", action="store_true", default=True, help="keep an EMA model")
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false", help="no EMA model")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per optimiser step")

    g = p.add_argument_group("distillation (DeiT)")
    g.add_argument("--teacher-model", default="regnety_160", help="timm name of the teacher")
    g.add_argument("--teacher-model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs for the teacher")
    g.add_argument("--teacher-path", default="", help="local teacher checkpoint (required for distillation)")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], help="distillation")
    g.add_argument("--distillation-alpha", type=float, default=0.5, help="weight of the distillation loss")
    g.add_argument("--distillation-tau", type=float, default=1.0, help="soft distillation temperature")

    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune", default="", help="initial weights (pos-embed interpolated, other-size head dropped)")
    g.add_argument("--attn-only", action="store_true", help="train only attention blocks, head and pos-embed")
    g.add_argument("--backbone_lr_scale", type=float, default=1.0, help="lr multiplier for all but the head")
    g.add_argument("--backbone_freeze_steps", type=int, default=0, help="optimiser steps with a frozen backbone")
    g.add_argument("--constant_cls", action="store_true", help="do not train the CLS token")
    g.add_argument("--constant_pos", action="store_true", help="do not train the position embedding")

    g = p.add_argument_group("data, output, runtime")
    g.add_argument("--data", "--data-path", "--data_path", dest="data", default=None, help="dataset root folder")
    g.add_argument("--dataset", "--data-set", default="imagenet", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--output_dir", "--output-dir", default="", help="checkpoints and logs (none if empty)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--seed", type=int, default=0, help="random seed (rank is added per process)")
    g.add_argument("--resume", default="", help="checkpoint to continue from (default: output_dir/checkpoint.pth)")
    g.add_argument("--no-auto-resume", action="store_true", help="do not resume from output_dir automatically")
    g.add_argument("--eval", action="store_true", help="only evaluate (weights from --resume or --finetune)")
    g.add_argument("--dist-eval", "--dist_eval", action="store_true", help="shard evaluation over processes")
    g.add_argument("--num_workers", type=int, default=10, help="data-loader worker processes")
    g.add_argument("--pin-mem", dest="pin_mem", action="store_true", default=True, help="pin loader memory")
    g.add_argument("--no-pin-mem", dest="pin_mem", action="store_false", help="do not pin loader memory")
    g.add_argument("--use_amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    g.add_argument("--amp-dtype", default=None, choices=[None, "bfloat16", "float16"], help="autocast dtype")
    g.add_argument("--save_more_than_best", action="store_true", help="also keep checkpoint_epoch{N}.pth")
    add_wandb_arguments(g)
    g.add_argument("--world_size", type=int, default=1, help="informational; torchrun sets the real value")
    g.add_argument("--dist_url", default="env://", help="process-group init method")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap batches per epoch (smoke tests)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# (flag, attribute, test, what the value must be): numeric flags checked before anything is built, so a bad value
# is named here instead of failing deep inside timm's scheduler or the data loader with an empty message.
_NUMERIC_RULES: list[tuple[str, str, Callable[[float], bool], str]] = [
    ("--batch-size", "batch_size", lambda v: v >= 1, "a positive number of images per process, e.g. 64"),
    ("--input-size", "input_size", lambda v: v >= 1, "a positive image side in pixels, e.g. 224"),
    ("--lr", "lr", lambda v: v >= 0, "a learning rate >= 0, e.g. 5e-4"),
    ("--min-lr", "min_lr", lambda v: v >= 0, "a learning rate >= 0, e.g. 1e-5"),
    ("--warmup-lr", "warmup_lr", lambda v: v >= 0, "a learning rate >= 0, e.g. 1e-6"),
    ("--warmup-epochs", "warmup_epochs", lambda v: v >= 0, "a number of epochs >= 0 (0 = no warm-up)"),
    ("--cooldown-epochs", "cooldown_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
    ("--decay-epochs", "decay_epochs", lambda v: v > 0, "a period in epochs > 0, e.g. 30"),
    ("--patience-epochs", "patience_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
    ("--weight-decay", "weight_decay", lambda v: v >= 0, "a weight decay >= 0, e.g. 0.05"),
    ("--drop", "drop", lambda v: 0 <= v < 1, "a dropout rate in [0, 1)"),
    ("--drop-path", "drop_path", lambda v: 0 <= v < 1, "a stochastic-depth rate in [0, 1)"),
    ("--smoothing", "smoothing", lambda v: 0 <= v < 1, "a label-smoothing amount in [0, 1)"),
    ("--clip-grad", "clip_grad", lambda v: v > 0, "a maximum gradient norm > 0 (or leave it unset)"),
    ("--max-steps-per-epoch", "max_steps_per_epoch", lambda v: v >= 1, "a positive number of batches"),
    ("--num_workers", "num_workers", lambda v: v >= 0, "a number of loader processes >= 0"),
    ("--momentum", "momentum", lambda v: 0 <= v < 1, "an SGD momentum in [0, 1), e.g. 0.9"),
    ("--decay-rate", "decay_rate", lambda v: 0 < v <= 1, "a step-schedule factor in (0, 1], e.g. 0.1"),
    ("--color-jitter", "color_jitter", lambda v: v >= 0, "a colour-jitter strength >= 0 (0 = off), e.g. 0.3"),
    ("--reprob", "reprob", lambda v: 0 <= v <= 1, "a random-erasing probability in [0, 1]"),
    ("--recount", "recount", lambda v: v >= 1, "a random-erasing count >= 1"),
    ("--crop-pct", "crop_pct", lambda v: 0 < v <= 1, "an eval crop fraction in (0, 1], e.g. 0.875"),
    ("--mixup", "mixup", lambda v: v >= 0, "a mixup alpha >= 0 (0 = off), e.g. 0.8"),
    ("--cutmix", "cutmix", lambda v: v >= 0, "a cutmix alpha >= 0 (0 = off), e.g. 1.0"),
    ("--mixup-prob", "mixup_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("--mixup-switch-prob", "mixup_switch_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("--model-ema-decay", "model_ema_decay", lambda v: 0 <= v < 1, "an EMA decay in [0, 1), e.g. 0.99996"),
    ("--distillation-alpha", "distillation_alpha", lambda v: 0 <= v <= 1, "a loss weight in [0, 1], e.g. 0.5"),
    ("--distillation-tau", "distillation_tau", lambda v: v > 0, "a temperature > 0, e.g. 1.0"),
    ("--backbone_lr_scale", "backbone_lr_scale", lambda v: v >= 0, "an lr multiplier >= 0 (1 = off)"),
    ("--backbone_freeze_steps", "backbone_freeze_steps", lambda v: v >= 0, "a number of optimiser steps >= 0"),
    ("--lr_batch_normalizer", "lr_batch_normalizer", lambda v: v > 0, "a batch size > 0, e.g. 512"),
]


def check_numbers(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` naming the first numeric flag whose value cannot work, and what it must be."""
    if not args.eval and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: the number of training epochs must be >= 1 (e.g. --epochs 300); "
                          "to only evaluate, pass --eval.")
    for flag, attr, ok, must in _NUMERIC_RULES:
        value = getattr(args, attr, None)
        if value is not None and not ok(value):
            raise ConfigError(f"{flag} {value}: must be {must}.")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad flag combinations before any model or data is built."""
    require_wandb(args.wandb_project)
    check_numbers(args)
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}.")
    validate_reduction(args.keep_rate, args.reduction_loc, args.linkage)
    if len(args.keep_rate) not in (1, len(args.reduction_loc)):
        raise ConfigError(f"--reduction_ratio/--keep_rate takes one keep rate or one per location "
                          f"({len(args.reduction_loc)}), got {len(args.keep_rate)}.")
    multilabel = args.dataset in MULTILABEL_DATASETS
    if multilabel and ((args.mixup or 0) > 0 or (args.cutmix or 0) > 0):
        raise ConfigError(f"{args.dataset} is multi-label: mixup/cutmix do not apply; pass --mixup 0 --cutmix 0.")
    if args.mixup is None:
        args.mixup = 0.0 if multilabel else 0.8
    if args.cutmix is None:
        args.cutmix = 0.0 if multilabel else 1.0
    if args.grad_accum_steps < 1:
        raise ConfigError("--grad_accum_steps must be >= 1.")
    if args.distillation_type != "none" and not args.teacher_path:
        raise ConfigError("--distillation-type soft|hard needs --teacher-path (a local teacher checkpoint).")
    if args.distillation_type != "none" and not Path(args.teacher_path).is_file():
        raise ConfigError(f"--teacher-path '{args.teacher_path}' does not exist (nothing is downloaded: give a local "
                          "checkpoint of --teacher-model).")
    if args.finetune and not Path(args.finetune).is_file():
        raise ConfigError(f"--finetune '{args.finetune}' does not exist.")
    import timm

    if is_reduction_model(args.model):
        # Registered reduction models are 12 blocks deep unless --model-kwargs says otherwise.
        depth = parse_model_kwargs(args.model_kwargs).get("depth", 12)
        validate_reduction(None, args.reduction_loc, None, depth)
    if not timm.is_model(args.model):
        raise ConfigError(f"unknown model {args.model!r}; e.g. atc_small_patch16_224, tome_small_patch16_224, "
                          "deit_small_patch16_224 (see timm.list_models()).")
    if args.eval and not (args.resume or args.finetune or find_resume(None, args.output_dir)):
        raise ConfigError("--eval needs weights: --resume CKPT or --finetune CKPT.")


def keep_rate_arg(args: argparse.Namespace) -> Any:
    return args.keep_rate[0] if len(args.keep_rate) == 1 else list(args.keep_rate)


def run_description(args: argparse.Namespace) -> dict[str, Any]:
    """What the run compares, under plain names for the logs and the W&B config: the reduction ``method``
    (``atc``, ``tome``, ``kmedoids``, ``dpcknn`` or ``none``) and the effective ``keep_rate`` (1.0 without
    reduction)."""
    method = args.model.split("_")[0] if is_reduction_model(args.model) else "none"
    return {"method": method, "keep_rate": keep_rate_arg(args) if method != "none" else 1.0}


def make_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    return build_classifier(args.model, num_classes, args.input_size, drop_rate=args.drop,
                            drop_path_rate=args.drop_path, reduction_loc=args.reduction_loc,
                            keep_rate=keep_rate_arg(args), linkage=args.linkage,
                            proportional_attn=args.proportional_attn, model_kwargs=parse_model_kwargs(args.model_kwargs))


def head_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(("head.", "head_dist.", "fc_norm."))}


def configure_trainable(model: nn.Module, args: argparse.Namespace) -> None:
    """--attn-only / --constant_cls / --constant_pos (each wired to its own parameter)."""
    if args.attn_only:
        for name, p in model.named_parameters():
            p.requires_grad = ".attn." in name or name.startswith(("head", "pos_embed"))
    if args.constant_cls and getattr(model, "cls_token", None) is not None:
        model.cls_token.requires_grad = False
    if args.constant_pos and getattr(model, "pos_embed", None) is not None:
        model.pos_embed.requires_grad = False


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """timm optimiser; with --backbone_lr_scale the non-head groups get ``lr_scale`` (applied by the scheduler)."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    kwargs: dict[str, Any] = {"eps": args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        kwargs["betas"] = tuple(args.opt_betas)
    params: Any = model
    if args.backbone_lr_scale != 1.0:
        head = head_parameter_names(model)
        named = {id(p): n for n, p in model.named_parameters()}
        params = []
        for group in param_groups_weight_decay(model, args.weight_decay, getattr(model, "no_weight_decay", set)()):
            for is_head in (True, False):
                ps = [p for p in group["params"] if (named[id(p)] in head) == is_head]
                if ps:
                    params.append({**group, "params": ps, "lr_scale": 1.0 if is_head else args.backbone_lr_scale})
    try:
        return create_optimizer_v2(params, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, **kwargs)
    except (ValueError, AssertionError) as exc:
        reason = str(exc) or "timm rejected the optimiser settings (check --lr, --opt-eps, --opt-betas, --momentum)"
        raise ConfigError(f"--opt {args.opt}: {reason}") from exc


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, updates_per_epoch: int) -> Any:
    from timm.scheduler import create_scheduler_v2

    try:
        sched, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            step_on_epochs=not args.sched_in_steps, updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as exc:
        reason = str(exc) or ("timm rejected the schedule settings (check --epochs, --warmup-epochs, "
                              "--decay-epochs, --cooldown-epochs)")
        raise ConfigError(f"--sched {args.sched}: {reason}") from exc
    if sched is None:
        raise ConfigError(f"unknown --sched {args.sched!r}; use cosine, step, multistep, plateau, poly or tanh.")
    return sched


def build_loaders(args: argparse.Namespace, train: bool = True) -> tuple[Any, Any, Any]:
    return data_build_loaders(
        args.dataset, args.data, args.input_size, args.batch_size, num_workers=args.num_workers, seed=args.seed,
        repeated_aug=args.repeated_aug, dist_eval=args.dist_eval, pin_mem=args.pin_mem, train=train,
        crop_pct=args.crop_pct, color_jitter=args.color_jitter, aa=args.aa, interpolation=args.train_interpolation,
        reprob=args.reprob, remode=args.remode, recount=args.recount, no_aug=args.no_aug)


def build_criterion(args: argparse.Namespace, multilabel: bool, mixup_active: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from atc.losses import AsymmetricLoss

    if multilabel:
        return AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    device = D.init_distributed(args.device, args.dist_url)
    from atc.utils import seed_everything

    seed_everything(args.seed + D.get_rank())
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    multilabel = args.dataset in MULTILABEL_DATASETS
    amp_dtype = amp_dtype_for(device, args.use_amp, args.amp_dtype)

    train_loader, val_loader, info = build_loaders(args, train=not args.eval)
    model = make_model(args, info.num_classes)
    for key, value in reduction_settings(model).items():  # record what the model uses, not "not given"
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.finetune:
        # DeiT's --finetune: plain bicubic pos-embed resampling, a head of another class count dropped
        load_checkpoint(model, args.finetune, strict=False, drop_mismatched_head=True, antialias=False,
                        what="--finetune checkpoint")
        print(f"loaded {args.finetune}")
    configure_trainable(model, args)
    model.to(device)
    print(f"model {args.model}: {count_parameters(model) / 1e6:.2f} M parameters, {info.num_classes} classes "
          f"({args.dataset}, {'multi-label' if multilabel else 'single-label'}), device {device}, "
          f"world size {D.get_world_size()}")

    if args.eval:
        ckpt = find_resume(args.resume or None, None if args.no_auto_resume else args.output_dir)
        if ckpt is not None:
            load_for_resume(ckpt, model)
        res = evaluate(model, val_loader, device, multilabel=multilabel, amp_dtype=amp_dtype,
                       gather=args.dist_eval, progress=not args.no_progress)
        print(json.dumps(res))
        return res

    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
    ddp_model: nn.Module = model
    if D.is_dist():
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    lr = args.lr
    if not args.unscale_lr:
        lr = args.lr * args.batch_size * args.grad_accum_steps * D.get_world_size() / args.lr_batch_normalizer
    optimizer = build_optimizer(model, args, lr)
    updates_per_epoch = len(train_loader) // args.grad_accum_steps
    if updates_per_epoch == 0:
        raise ConfigError("fewer batches per epoch than --grad_accum_steps; lower it or the batch size.")
    lr_scheduler = build_scheduler(optimizer, args, updates_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=info.num_classes)
    criterion: Any = build_criterion(args, multilabel, mixup_fn is not None)
    distill = args.distillation_type != "none"
    if distill:
        from atc.losses import DistillationLoss

        teacher = build_classifier(args.teacher_model, info.num_classes, args.input_size,
                                   model_kwargs=parse_model_kwargs(args.teacher_model_kwargs))
        load_checkpoint(teacher, args.teacher_path, strict=False, antialias=False, what="--teacher-path checkpoint")
        teacher.to(device).eval()
        criterion = DistillationLoss(criterion, teacher, args.distillation_type, args.distillation_alpha,
                                     args.distillation_tau)

    head = head_parameter_names(model)
    frozen = [p for n, p in model.named_parameters() if n not in head] if args.backbone_freeze_steps else []
    resume = None if args.no_auto_resume and not args.resume else find_resume(args.resume or None, args.output_dir)
    cfg = FitConfig(epochs=args.epochs, output_dir=args.output_dir or None, accum_steps=args.grad_accum_steps,
                    clip_grad=args.clip_grad, sched_in_steps=args.sched_in_steps, multilabel=multilabel,
                    distillation=distill, dist_eval=args.dist_eval, save_more_than_best=args.save_more_than_best,
                    freeze_steps=args.backbone_freeze_steps, progress=not args.no_progress,
                    args={**vars(args), **run_description(args), "num_classes": info.num_classes,
                          "script": "train_deit"},
                    wandb_project=args.wandb_project, wandb_group=args.wandb_group, wandb_name=args.wandb_name,
                    max_steps_per_epoch=args.max_steps_per_epoch)
    if args.output_dir and D.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "args.json").write_text(json.dumps(vars(args), indent=2))
    row = fit(cfg, ddp_model, train_loader, val_loader, criterion, optimizer, device, lr_scheduler=lr_scheduler,
              model_ema=model_ema, scaler=scaler, amp_dtype=amp_dtype, mixup_fn=mixup_fn, frozen_params=frozen,
              resume_from=resume, log=print if D.is_main_process() else (lambda s: None))
    D.cleanup()
    return row


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
