"""Detection training/evaluation loop driven by an mmdet-style mmengine Config.

Reuses atc.engine's AMP helpers, checkpointing (atomic), logger (CSV/JSONL/W&B) and atc.distributed.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from atc import distributed as D
from atc.detection.coco import CocoInstances, coco_evaluate, collate, to_coco_results
from atc.detection.detector import build_detector
from atc.engine import ConfigError, EpochLogger, amp_dtype_for, autocast, save_checkpoint
from atc.utils import seed_everything

__all__ = ["build_dataset", "build_model", "evaluate", "train", "load_weights"]


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def build_dataset(cfg: Any, split: str) -> CocoInstances:
    """``cfg.data[split]`` with ``ann_file``/``img_prefix`` relative to ``cfg.data_root`` (so overriding
    ``data_root`` alone moves every split)."""
    d = cfg.data[split]
    root = cfg.get("data_root", "")
    if root and not Path(root).is_dir():
        raise ConfigError(f"data_root '{root}' does not exist: pass --cfg-options data_root=/path/to/coco/")
    try:
        return CocoInstances(_resolve(root, d.img_prefix), _resolve(root, d.ann_file),
                             flip_prob=float(d.get("flip_prob", 0.0)))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc


def build_model(cfg: Any) -> torch.nn.Module:
    try:
        return build_detector(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else cfg.model)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad model config: {exc}") from exc


def load_weights(model: torch.nn.Module, path: str) -> None:
    """``load_from``: a local checkpoint (ours, with 'model', or a plain/'state_dict' dict). Loads strictly for
    our checkpoints; for others only matching keys (e.g. backbone weights) and reports what was skipped."""
    if not Path(path).is_file():
        raise ConfigError(f"load_from '{path}' not found (only local files are supported; nothing is downloaded)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"'{path}' holds no state dict")
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fit:
        fit = _vit_backbone_weights(state, own)
    if not fit:
        raise ConfigError(f"checkpoint '{path}' shares no weights with this model (wrong architecture? check "
                          f"model.backbone embed_dim/depth and num_classes)")
    model.load_state_dict(fit, strict=False)
    if D.is_main_process() and len(fit) < len(own):
        print(f"load_from: loaded {len(fit)}/{len(own)} tensors from {path}")


def _vit_backbone_weights(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A plain timm/DeiT ViT checkpoint as backbone initialisation (as the published configs do): keys get the
    ``backbone.body.`` prefix, ``patch_embed.proj`` becomes ``patch_embed``, and the position embedding loses its
    class/distillation tokens and is resampled to the backbone's pretraining grid."""
    out = {}
    for key, value in state.items():
        name = "backbone.body." + key.replace("patch_embed.proj.", "patch_embed.")
        if name not in own:
            continue
        if key == "pos_embed" and value.shape != own[name].shape:
            grid = own[name].shape[1]
            value = value[:, value.shape[1] - int(value.shape[1] ** 0.5) ** 2:]  # drop prefix tokens
            side, new_side = int(value.shape[1] ** 0.5), int(grid ** 0.5)
            if side != new_side:
                value = torch.nn.functional.interpolate(
                    value.reshape(1, side, side, -1).permute(0, 3, 1, 2).float(), size=(new_side, new_side),
                    mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, grid, -1)
        if value.shape == own[name].shape:
            out[name] = value
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: CocoInstances, device: torch.device, *, batch_size: int = 1,
             metrics: tuple[str, ...] = ("bbox", "segm"), amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """COCO bbox/segm AP of ``model`` on ``dataset`` (sharded over processes, gathered on every rank)."""
    model.eval()
    idx = list(range(D.get_rank(), len(dataset), D.get_world_size()))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, collate_fn=collate)
    label_to_cat = dataset.cat_ids
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", disable=not D.is_main_process(), leave=False):
        with autocast(device, amp_dtype):
            outs = model([im.to(device) for im in images])
        results += to_coco_results(outs, [int(t["image_id"]) for t in targets], label_to_cat)
    if D.is_dist():
        parts: list[Any] = [None] * D.get_world_size()
        torch.distributed.all_gather_object(parts, results)
        results = [r for p in parts for r in p]
    return coco_evaluate(dataset.coco, results, metrics, img_ids=dataset.ids)


def _lr_factor(cfg: Any, epoch: int, it: int) -> float:
    """mmdet ``lr_config``: linear warmup over ``warmup_iters`` from ``warmup_ratio``, then step decay ×0.1."""
    lc = cfg.lr_config
    factor = 0.1 ** sum(epoch >= s for s in lc.get("step", []))
    warm = int(lc.get("warmup_iters", 0)) if lc.get("warmup") else 0
    if it < warm:
        r = float(lc.get("warmup_ratio", 0.001))
        factor *= r + (1 - r) * it / warm
    return factor


def train(cfg: Any, *, resume: str | None = None, wandb_project: str | None = None,
          wandb_group: str | None = None) -> dict[str, float]:
    """Train ``cfg.runner.max_epochs`` epochs with accumulation (``cumulative_iters``) and AMP (``fp16`` or
    ``amp``), evaluating every ``evaluation.interval`` epochs; checkpoints ``latest.pth``/``epoch_N.pth``
    in ``cfg.work_dir``. Returns the last evaluation."""
    device = D.init_distributed(cfg.get("device", "auto"))
    seed_everything(int(cfg.get("seed", 0)) + D.get_rank())
    work = Path(cfg.work_dir)
    accum = int(cfg.get("cumulative_iters", 1))
    if accum < 1:
        raise ConfigError(f"cumulative_iters must be >= 1, got {accum}")
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    model = build_model(cfg).to(device)
    if cfg.get("load_from"):
        load_weights(model, cfg.load_from)
    opt_cfg = dict(cfg.optimizer)
    kind = opt_cfg.pop("type", "AdamW")
    if kind != "AdamW":
        raise ConfigError(f"optimizer type {kind!r} is not supported here: use AdamW (as the published configs)")
    ignored = [key for key in ("constructor", "paramwise_cfg") if opt_cfg.pop(key, None) is not None]
    if ignored and D.is_main_process():
        warnings.warn(f"optimizer {', '.join(ignored)} (e.g. mmdet's layer-wise lr decay) is not supported by this "
                      f"engine and is ignored: every parameter gets lr {opt_cfg.get('lr')}", stacklevel=2)
    base_lr = float(opt_cfg["lr"])
    optimizer = torch.optim.AdamW(model.parameters(), **opt_cfg)
    amp_dtype = amp_dtype_for(device, bool(cfg.get("amp", False) or cfg.get("fp16")))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start_epoch = 0
    ckpt_path = Path(resume) if resume else (work / "latest.pth" if (work / "latest.pth").is_file() and
                                             cfg.get("auto_resume", True) else None)
    if resume and not Path(resume).is_file():
        raise ConfigError(f"--resume '{resume}' does not exist")
    if ckpt_path is not None:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        try:
            model.load_state_dict(ck["model"])
        except (RuntimeError, KeyError) as exc:
            raise ConfigError(f"checkpoint '{ckpt_path}' does not fit this config's model: "
                              f"{str(exc).splitlines()[0]}") from exc
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch = int(ck["epoch"])
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if D.is_dist() else model
    bs = int(cfg.data.samples_per_gpu)
    sampler = DistributedSampler(train_set, D.get_world_size(), D.get_rank(), shuffle=True, seed=int(cfg.get("seed", 0)))
    loader = DataLoader(train_set, batch_size=bs, sampler=sampler, collate_fn=collate,
                        num_workers=int(cfg.data.get("workers_per_gpu", 0)))
    grad_clip = (cfg.get("optimizer_config") or {}).get("grad_clip")
    logger = EpochLogger(work, start_epoch=start_epoch, wandb_project=wandb_project, wandb_group=wandb_group,
                         config=cfg.to_dict() if hasattr(cfg, "to_dict") else None)
    max_epochs, interval = int(cfg.runner.max_epochs), int(cfg.evaluation.get("interval", 1))
    metrics = tuple(cfg.evaluation.get("metric", ("bbox", "segm")))
    res: dict[str, float] = {}
    it = start_epoch * math.ceil(len(loader) / accum)
    for epoch in range(start_epoch, max_epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{max_epochs}", disable=not D.is_main_process())
        optimizer.zero_grad(set_to_none=True)
        for step, (images, targets) in enumerate(bar):
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with autocast(device, amp_dtype):
                losses = ddp(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss.item()} at epoch {epoch + 1} step {step}: lower the "
                                   f"lr (optimizer.lr) or enable grad clipping (optimizer_config.grad_clip)")
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            if (step + 1) % accum == 0 or step + 1 == len(loader):
                for g in optimizer.param_groups:
                    g["lr"] = base_lr * _lr_factor(cfg, epoch, it)
                if scaler:
                    scaler.unscale_(optimizer)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip.get("max_norm", 35)))
                (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                it += 1
            total, n = total + loss.item(), n + 1
            bar.set_postfix(loss=f"{total / n:.3f}")
        row: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(n, 1), "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % interval == 0 or epoch + 1 == max_epochs:
            res = evaluate(model, val_set, device, metrics=metrics, amp_dtype=amp_dtype)
            row.update(res)
            if D.is_main_process():
                print(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in res.items() if k.endswith(("mAP", "_50"))))
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "config": cfg.pretty_text if hasattr(cfg, "pretty_text") else None, "metrics": res}
        save_checkpoint(work / "latest.pth", **state)
        if (epoch + 1) % int(cfg.get("checkpoint_config", {}).get("interval", 1)) == 0:
            save_checkpoint(work / f"epoch_{epoch + 1}.pth", **state)
        logger.log(row)
        D.barrier()
    logger.finish()
    return res
