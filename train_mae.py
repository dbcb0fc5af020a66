#!/usr/bin/env python
"""Fine-tune an MAE-pretrained ViT with token merging in every block (the MAE recipe: layer-wise lr decay,
``--blr`` scaling, mixup/cutmix, drop path, global average pooling — size-weighted when tokens are merged).

    python train_mae.py --data /data/imagenet --batch_size 256 --accum_iter 2 --model vit_base_patch16 \
        --finetune mae_pretrain_vit_base.pth --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
        --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --output_dir runs/mae_atc \
        --merge_fn atc --r-count 16 --r-sched constant --linkage average

Shares the training loop, checkpointing/resume and logging with train_deit.py (atc.engine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from atc import distributed as D
from atc.checkpoint import find_resume, load_checkpoint, load_for_resume
from atc.cli import ConfigError, parse_model_kwargs, run_cli
from atc.cluster import LINKAGES
from atc.data import DATASETS, MULTILABEL_DATASETS, build_loaders
from atc.engine import FitConfig, amp_dtype_for, count_parameters, evaluate, fit
from atc.tracking import add_wandb_arguments, require_wandb

MAE_MODELS = {"vit_base_patch16": "vit_base_patch16_224", "vit_large_patch16": "vit_large_patch16_224",
              "vit_huge_patch14": "vit_huge_patch14_224"}
MERGE_FNS = ("tome", "atc")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("train_mae.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("token merging")
    g.add_argument("--r-count", "--r_count", type=int, default=0, help="tokens removed per block (0 = none)")
    g.add_argument("--r-sched", "--r_sched", default="constant", choices=["constant", "decrease"],
                   help="r per block: constant, or a linear ramp from 2r down to 0")
    g.add_argument("--merge_fn", default="atc", help=f"merging method: {'|'.join(MERGE_FNS)}")
    g.add_argument("--linkage", default="average", help=f"ATC linkage: {'|'.join(sorted(LINKAGES))}")
    g = p.add_argument_group("MAE fine-tuning recipe")
    g.add_argument("--batch_size", "--batch-size", type=int, default=64, help="per-process batch size")
    g.add_argument("--epochs", type=int, default=50, help="total epochs")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--model", default="vit_base_patch16",
                   help=f"{', '.join(MAE_MODELS)} or any timm ViT name")
    g.add_argument("--model-kwargs", "--model_kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs (e.g. embed_dim=64 depth=4 num_heads=2)")
    g.add_argument("--input_size", "--input-size", type=int, default=224, help="image side in pixels")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--weight_decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default blr * eff_batch / 256)")
    g.add_argument("--blr", type=float, default=1e-3, help="base lr: lr = blr * batch * accum * world / 256")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    g.add_argument("--min_lr", type=float, default=1e-6, help="lower lr bound")
    g.add_argument("--warmup_epochs", type=int, default=5, help="warm-up epochs")
    g.add_argument("--color_jitter", type=float, default=None, help="colour jitter (off by default)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="auto-augment policy ('none' to disable)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--reprob", type=float, default=0.25, help="random-erasing probability")
    g.add_argument("--remode", default="pixel", help="random-erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random-erasing count")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup_mode", default="batch", help="batch, pair or elem")
    g.add_argument("--finetune", default="", help="MAE pre-trained checkpoint (local file)")
    g.add_argument("--global_pool", action="store_true", default=True, help="average-pool tokens (MAE default)")
    g.add_argument("--cls_token", dest="global_pool", action="store_false", help="classify from the CLS token")
    g = p.add_argument_group("data, output, runtime")
    g.add_argument("--data_path", "--data", dest="data", default=None, help="dataset root folder")
    g.add_argument("--dataset", default="imagenet", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--nb_classes", type=int, default=None, help="classes (default: the dataset's)")
    g.add_argument("--output_dir", default="", help="checkpoints and logs")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--resume", default="", help="checkpoint to continue (default: output_dir/checkpoint.pth)")
    g.add_argument("--eval", action="store_true", help="only evaluate")
    g.add_argument("--dist_eval", "--dist-eval", action="store_true", help="shard evaluation over processes")
    g.add_argument("--num_workers", type=int, default=10, help="data-loader workers")
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin loader memory")
    g.add_argument("--no_pin_mem", dest="pin_mem", action="store_false", help="do not pin loader memory")
    g.add_argument("--use_amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    g.add_argument("--dist_url", default="env://", help="process-group init method")
    g.add_argument("--world_size", type=int, default=1, help="informational; torchrun sets the real value")
    add_wandb_arguments(g)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def build_mae_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    import timm

    name = MAE_MODELS.get(args.model, args.model)
    if not timm.is_model(name):
        raise ConfigError(f"unknown model {args.model!r}; use {', '.join(MAE_MODELS)} or a timm ViT name.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=args.input_size,
                              drop_path_rate=args.drop_path, global_pool="avg" if args.global_pool else "token",
                              **parse_model_kwargs(args.model_kwargs))
    if args.finetune:
        # as DeiT's --finetune: bicubic pos-embed resampling, the pretraining head (if any) dropped
        load_checkpoint(model, args.finetune, strict=False, drop_mismatched_head=True, antialias=False,
                        what="--finetune checkpoint")
        # MAE: a freshly initialised head with a tiny std.
        if isinstance(getattr(model, "head", None), nn.Linear):
            nn.init.trunc_normal_(model.head.weight, std=2e-5)
            nn.init.zeros_(model.head.bias)
    if args.r_count > 0:
        import atc.patch

        try:
            atc.patch.timm(model, method=args.merge_fn, linkage=args.linkage, proportional_attn=False)
        except ImportError as exc:
            raise ConfigError(f"token merging needs atc.patch.timm_vit, which could not be imported: {exc}") from exc
        model.r = (args.r_count, args.r_sched)
    return model


def check_args(args: argparse.Namespace) -> None:
    require_wandb(args.wandb_project)
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}.")
    if args.merge_fn not in MERGE_FNS:
        raise ConfigError(f"unknown --merge_fn {args.merge_fn!r}; choose one of {', '.join(MERGE_FNS)}.")
    if args.linkage not in LINKAGES:
        raise ConfigError(f"unknown linkage {args.linkage!r}; choose one of {', '.join(sorted(LINKAGES))}.")
    if args.r_count < 0:
        raise ConfigError("--r-count must be >= 0.")
    if args.dataset in MULTILABEL_DATASETS and (args.mixup > 0 or args.cutmix > 0):
        raise ConfigError(f"{args.dataset} is multi-label: pass --mixup 0 --cutmix 0.")
    if args.accum_iter < 1:
        raise ConfigError("--accum_iter must be >= 1.")
    if args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: the number of training epochs must be >= 1, e.g. --epochs 50.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be a positive number of images per process.")
    if not 0 <= args.warmup_epochs < args.epochs:
        # the cosine phase lasts epochs - warmup_epochs (MAE's schedule), so it needs at least one epoch
        raise ConfigError(f"--warmup_epochs {args.warmup_epochs}: must be in [0, --epochs) = [0, {args.epochs}), "
                          "since the cosine decay runs over the epochs after the warm-up.")


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    device = D.init_distributed(args.device, args.dist_url)
    from atc.utils import seed_everything

    seed_everything(args.seed + D.get_rank())
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    multilabel = args.dataset in MULTILABEL_DATASETS
    amp_dtype = amp_dtype_for(device, args.use_amp)
    train_loader, val_loader, info = build_loaders(
        args.dataset, args.data, args.input_size, args.batch_size, num_workers=args.num_workers, seed=args.seed,
        dist_eval=args.dist_eval, pin_mem=args.pin_mem, train=not args.eval, color_jitter=args.color_jitter,
        aa=args.aa, interpolation="bicubic", reprob=args.reprob, remode=args.remode, recount=args.recount,
        no_aug=args.no_aug)
    num_classes = args.nb_classes or info.num_classes
    model = build_mae_model(args, num_classes).to(device)
    print(f"model {args.model} ({count_parameters(model) / 1e6:.2f} M params), merge {args.merge_fn if args.r_count else 'none'} "
          f"r={args.r_count} ({args.r_sched}), {args.dataset}: {num_classes} classes, world size {D.get_world_size()}")
    if args.eval:
        ckpt = find_resume(args.resume or None, args.output_dir)
        if ckpt is not None:
            load_for_resume(ckpt, model)
        res = evaluate(model, val_loader, device, multilabel=multilabel, amp_dtype=amp_dtype, gather=args.dist_eval)
        print(json.dumps(res))
        return res

    eff_batch = args.batch_size * args.accum_iter * D.get_world_size()
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    # Layer-wise lr decay via timm's param_groups_layer_decay (groups carry lr_scale, applied by the scheduler).
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=args.weight_decay,
                                    layer_decay=args.layer_decay)
    updates_per_epoch = len(train_loader) // args.accum_iter
    # MAE: per-iteration linear warm-up from 0, then half-cycle cosine over the remaining epochs.
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs - args.warmup_epochs,
                                          min_lr=args.min_lr, warmup_lr=0.0, warmup_epochs=args.warmup_epochs,
                                          warmup_prefix=True, step_on_epochs=False,
                                          updates_per_epoch=updates_per_epoch)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from atc.losses import AsymmetricLoss

    if multilabel:
        criterion: nn.Module = AsymmetricLoss()
    elif mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    ddp_model: nn.Module = model
    if D.is_dist():
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    cfg = FitConfig(epochs=args.epochs, output_dir=args.output_dir or None, accum_steps=args.accum_iter,
                    clip_grad=args.clip_grad, sched_in_steps=True, multilabel=multilabel, dist_eval=args.dist_eval,
                    eval_before_training=False, progress=not args.no_progress,
                    args={**vars(args), "method": args.merge_fn if args.r_count > 0 else "none",
                          "num_classes": num_classes, "script": "train_mae"},
                    wandb_project=args.wandb_project, wandb_group=args.wandb_group, wandb_name=args.wandb_name)
    if args.output_dir and D.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "args.json").write_text(json.dumps(vars(args), indent=2))
    row = fit(cfg, ddp_model, train_loader, val_loader, criterion, optimizer, device, lr_scheduler=lr_scheduler,
              scaler=scaler, amp_dtype=amp_dtype, mixup_fn=mixup_fn,
              resume_from=find_resume(args.resume or None, args.output_dir),
              log=print if D.is_main_process() else (lambda s: None))
    D.cleanup()
    return row


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
