"""Detection training/evaluation loop driven by an mmdet-style mmengine Config.

Reuses :mod:`atc.engine`'s AMP helpers and optimiser step (accumulation, loss scaler, clipping),
:mod:`atc.checkpoint` (one rule for reading weights, atomic checkpoints), :class:`atc.tracking.EpochLogger`
(CSV/JSONL/W&B) and :mod:`atc.distributed` (torchrun: NCCL on GPU, gloo on CPU). Config keys follow mmdet 2.x, as the published
configs: ``optimizer`` (+ ``paramwise_cfg.custom_keys``), ``optimizer_config.grad_clip``, ``lr_config`` (step
policy with linear warm-up, counted in iterations), ``runner.max_epochs``, ``cumulative_iters``, ``fp16``/``amp``,
``checkpoint_config`` (``interval``, ``max_keep_ckpts``), ``evaluation``, ``load_from``, ``resume_from``,
``work_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from atc import distributed as D
from atc.checkpoint import (CheckpointError, load_state_dict_checked, read_checkpoint, save_checkpoint,
                            state_dict_from_checkpoint)
from atc.cli import ConfigError
from atc.data import usable_workers
from atc.detection.coco import CocoInstances, coco_evaluate, collate, to_coco_results
from atc.detection.detector import build_detector
from atc.detection.vit_adapter import vit_state_dict_for_adapter
from atc.engine import amp_dtype_for, autocast, backward, no_sync_unless, optimizer_step
from atc.tracking import EpochLogger
from atc.utils import seed_everything

__all__ = ["build_dataset", "build_model", "build_optimizer", "evaluate", "train", "load_weights",
           "load_checkpoint_model", "run_description"]


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _plain(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def build_dataset(cfg: Any, split: str) -> CocoInstances:
    """``cfg.data[split]`` with ``ann_file``/``img_prefix`` relative to ``cfg.data_root`` (so overriding
    ``data_root`` alone moves every split)."""
    if split not in cfg.data:
        raise ConfigError(f"the config has no data.{split} split")
    d = cfg.data[split]
    root = cfg.get("data_root", "") or ""
    if root and not Path(root).is_dir():
        raise ConfigError(f"data_root '{root}' does not exist: pass --cfg-options data_root=/path/to/coco/")
    try:
        return CocoInstances(_resolve(root, d.img_prefix), _resolve(root, d.ann_file),
                             flip_prob=float(d.get("flip_prob", 0.0)))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc


def build_model(cfg: Any, load_pretrained: bool = False) -> torch.nn.Module:
    """The detector of ``cfg.model``; bad settings (linkage, keep fraction, unknown keys) become a ConfigError."""
    try:
        return build_detector(_plain(cfg.model), load_pretrained=load_pretrained)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"bad model config: {exc}") from exc


def _load(path: str | os.PathLike, what: str) -> tuple[Any, dict[str, Any]]:
    """``(checkpoint, state_dict)`` of a local file, weights picked by :mod:`atc.checkpoint`'s rule."""
    ckpt = read_checkpoint(path, what)
    state = state_dict_from_checkpoint(ckpt, source=f"{what} '{path}'")
    if not state:
        raise ConfigError(f"{what} '{path}' holds no state dict")
    return ckpt, state


def _mismatch(state: dict[str, Any], own: dict[str, Any]) -> list[str]:
    return [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]


def load_checkpoint_model(model: torch.nn.Module, path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Strictly load a detector checkpoint written by the training loop (:func:`atc.checkpoint.load_state_dict_checked`);
    a checkpoint of another architecture (other widths, backbone type or class count) is a clear
    :class:`ConfigError`. Returns the raw checkpoint."""
    ckpt, state = _load(path, what)
    try:
        load_state_dict_checked(model, state, f"{what} '{path}'")
    except CheckpointError as exc:
        raise ConfigError(f"{exc}\n  (this config's model: compare model.backbone type/embed_dim/depth and "
                          "model.num_classes)") from None
    return ckpt if isinstance(ckpt, dict) else {}


def load_weights(model: torch.nn.Module, path: str) -> None:
    """``load_from``: initialise from a local checkpoint, as mmdet does for fine-tuning.

    A detector checkpoint (ours) loads every tensor it shares with the model; new parts (e.g. SViT's selectors
    when fine-tuning from ``vit-adapter-t-3x``) keep their initialisation, and a shape mismatch inside the
    backbone is an error (another architecture). A plain DeiT/timm ViT checkpoint initialises the backbone's
    ViT part.
    """
    _, state = _load(path, "load_from")
    own = model.state_dict()
    if any(k.startswith("backbone.") for k in state):
        bad = _mismatch(state, own)
        if any(k.startswith("backbone.body.") for k in bad):
            raise ConfigError(f"load_from '{path}' does not fit this model's backbone (another architecture?): "
                              f"shape mismatch for {[k for k in bad if k.startswith('backbone.body.')][:3]}")
        fit = {k: v for k, v in state.items() if k in own and k not in bad}
    else:
        fit = vit_state_dict_for_adapter(state, model.backbone.body, prefix="backbone.body.")
    if not fit:
        raise ConfigError(f"load_from '{path}' shares no weights with this model (wrong architecture? check "
                          f"model.backbone embed_dim/depth)")
    model.load_state_dict(fit, strict=False)
    if D.is_main_process():
        skipped = [k for k in state if k not in fit]
        print(f"load_from: loaded {len(fit)}/{len(own)} tensors from {path}"
              + (f"; skipped {len(skipped)} (e.g. {skipped[:2]})" if skipped else ""))


def build_optimizer(model: torch.nn.Module, optimizer_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with mmcv's ``paramwise_cfg.custom_keys``: the longest key contained in a parameter's name sets its
    ``lr_mult``/``decay_mult`` (the published configs exempt ``level_embed``, ``pos_embed``, ``norm`` and
    ``bias`` from weight decay)."""
    cfg = dict(optimizer_cfg)
    cfg.pop("_delete_", None)
    kind = cfg.pop("type", "AdamW")
    if kind != "AdamW":
        raise ConfigError(f"optimizer type {kind!r} is not supported here: use AdamW (as the published configs)")
    constructor = cfg.pop("constructor", None)
    if constructor not in (None, "DefaultOptimizerConstructor"):
        raise ConfigError(f"optimizer constructor {constructor!r} is not supported (the published ATC/SViT configs "
                          f"use the default one with paramwise_cfg.custom_keys)")
    paramwise = dict(cfg.pop("paramwise_cfg", None) or {})
    custom = {k: dict(v) for k, v in dict(paramwise.pop("custom_keys", None) or {}).items()}
    if paramwise:
        raise ConfigError(f"optimizer.paramwise_cfg keys {sorted(paramwise)} are not supported (only custom_keys)")
    for key, mult in custom.items():
        if set(mult) - {"lr_mult", "decay_mult"}:
            raise ConfigError(f"paramwise_cfg.custom_keys.{key} supports lr_mult and decay_mult, got {sorted(mult)}")
    lr, wd = float(cfg.pop("lr")), float(cfg.pop("weight_decay", 0.0))
    keys = sorted(custom, key=lambda k: (-len(k), k))  # mmcv: longer (more specific) keys win
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((custom[k] for k in keys if k in name), {})
        group = (lr * float(mult.get("lr_mult", 1.0)), wd * float(mult.get("decay_mult", 1.0)))
        groups.setdefault(group, []).append(param)
    params = [{"params": p, "lr": g_lr, "initial_lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), p in groups.items()]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **cfg)
    except TypeError as exc:
        raise ConfigError(f"bad optimizer setting: {exc}") from exc


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: CocoInstances, device: torch.device, *, batch_size: int = 1,
             metrics: tuple[str, ...] = ("bbox", "segm"), amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """COCO bbox/segm AP of ``model`` on ``dataset`` (sharded over processes, gathered on every rank)."""
    model.eval()
    idx = list(range(D.get_rank(), len(dataset), D.get_world_size()))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, collate_fn=collate)
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", disable=not D.is_main_process(), leave=False):
        with autocast(device, amp_dtype):
            outs = model([im.to(device) for im in images])
        results += to_coco_results(outs, [int(t["image_id"]) for t in targets], dataset.cat_ids)
    if D.is_dist():
        parts: list[Any] = [None] * D.get_world_size()
        torch.distributed.all_gather_object(parts, results)
        results = [r for p in parts for r in p]
    return coco_evaluate(dataset.coco, results, metrics, img_ids=dataset.ids)


def lr_factor(lr_config: dict[str, Any], epoch: int, it: int) -> float:
    """mmcv's step policy: ×``gamma`` (0.1) at each epoch in ``step``; linear warm-up from ``warmup_ratio`` over
    the first ``warmup_iters`` iterations (batches, as mmcv counts them)."""
    policy = lr_config.get("policy", "step")
    if policy != "step":
        raise ConfigError(f"lr_config.policy {policy!r} is not supported (the published configs use 'step')")
    factor = float(lr_config.get("gamma", 0.1)) ** sum(epoch >= s for s in lr_config.get("step", []))
    warm = int(lr_config.get("warmup_iters", 0)) if lr_config.get("warmup") else 0
    if lr_config.get("warmup") not in (None, "linear"):
        raise ConfigError(f"lr_config.warmup {lr_config['warmup']!r} is not supported (use 'linear' or None)")
    if it < warm:
        r = float(lr_config.get("warmup_ratio", 0.001))
        factor *= r + (1 - r) * it / warm
    return factor


def _amp(cfg: Any, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """``fp16=dict(loss_scale=dict(init_scale=512))`` (published) or ``amp=True``: fp16 + GradScaler on CUDA,
    bf16 autocast (no scaler) on CPU."""
    fp16 = cfg.get("fp16")
    dtype = amp_dtype_for(device, bool(cfg.get("amp", False) or fp16))
    if dtype != torch.float16:
        return dtype, None
    scale = dict(dict(fp16 or {}).get("loss_scale") or {}) if isinstance(fp16, dict) else {}
    return dtype, torch.amp.GradScaler("cuda", init_scale=float(scale.get("init_scale", 2.0**16)))


def _prune_checkpoints(work: Path, keep: int) -> None:
    if keep <= 0 or not D.is_main_process():
        return
    ckpts = sorted(work.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    for old in ckpts[:-keep]:
        old.unlink(missing_ok=True)


def run_description(cfg: Any) -> dict[str, Any]:
    """What a detection run compares, under the names train_deit.py logs (for the W&B config, next to the full
    config): ``backbone`` (its type), ``method`` (``atc``, ``tome``, ``svit`` or ``none``), ``linkage``,
    ``keep_rate``, ``reduction_loc``, ``proportional_attn``, ``seed``."""
    from atc.detection.svit import DEFAULT_KEEP_RATE as SVIT_KEEP_RATE
    from atc.detection.vit_adapter import config_keep_rate

    backbone = dict(_plain(cfg.model).get("backbone") or {})
    kind = backbone.get("type", "ViTAdapter")
    keep = config_keep_rate(backbone)  # keep_rate or its published keys reduction_ratio / keep_ratio
    if kind == "SViTAdapter":
        method, keep = "svit", SVIT_KEEP_RATE if keep is None else keep
    elif keep is None:
        method = "none"
    else:
        # linkage='tome' is the published configs' spelling of method='tome' (see ViTAdapter)
        method = "tome" if backbone.get("linkage") == "tome" else backbone.get("method", "atc")
    return {"backbone": kind, "method": method, "linkage": backbone.get("linkage"),
            "keep_rate": 1.0 if keep is None else keep, "reduction_loc": backbone.get("reduction_loc"),
            "proportional_attn": backbone.get("proportional_attn"), "seed": int(cfg.get("seed", 0))}


def train(cfg: Any, *, resume: str | None = None, wandb_project: str | None = None,
          wandb_group: str | None = None, wandb_name: str | None = None) -> dict[str, float]:
    """Train ``cfg.runner.max_epochs`` epochs with gradient accumulation (``cumulative_iters``) and AMP,
    evaluating every ``evaluation.interval`` epochs; atomic checkpoints ``latest.pth``/``epoch_N.pth`` in
    ``cfg.work_dir``. Resumes from ``resume`` or, when ``auto_resume`` (default), ``work_dir/latest.pth``.
    With ``wandb_project``, the epochs also go to a W&B run (:class:`atc.tracking.EpochLogger`; a resumed training
    continues its run). Returns the last evaluation."""
    device = D.init_distributed(str(cfg.get("device", "auto")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cpu" and D.is_dist() and local_world > 1:  # share the cores instead of oversubscribing
        torch.set_num_threads(max(1, usable_workers(os.cpu_count() or 1) // local_world))
    seed = int(cfg.get("seed", 0))
    seed_everything(seed + D.get_rank())
    work = Path(cfg.work_dir)
    accum = int(cfg.get("cumulative_iters", 1))
    if accum < 1:
        raise ConfigError(f"cumulative_iters must be >= 1, got {accum}")
    if resume and not Path(resume).is_file():
        raise ConfigError(f"--resume '{resume}' does not exist")
    ckpt_path = Path(resume) if resume else (work / "latest.pth" if cfg.get("auto_resume", True) and
                                             (work / "latest.pth").is_file() else None)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    model = build_model(cfg, load_pretrained=ckpt_path is None)
    if ckpt_path is None and cfg.get("load_from"):
        load_weights(model, cfg.load_from)
    model.to(device)
    optimizer = build_optimizer(model, _plain(cfg.optimizer))
    amp_dtype, scaler = _amp(cfg, device)
    start_epoch, res, wandb_run_id = 0, {}, None
    if ckpt_path is not None:
        ck = load_checkpoint_model(model, ckpt_path, "resume checkpoint")
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"resume checkpoint '{ckpt_path}' has no usable optimizer state (was the optimizer "
                              f"config changed?): {exc}") from exc
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch, res = int(ck["epoch"]), dict(ck.get("metrics") or {})
        wandb_run_id = ck.get("wandb_run_id")
        if D.is_main_process():
            print(f"resumed from {ckpt_path} (epoch {start_epoch})")
    max_epochs = int(cfg.runner.max_epochs)
    if ckpt_path is not None and start_epoch >= max_epochs and D.is_main_process():
        print(f"nothing to do: the checkpoint already finished {start_epoch} of {max_epochs} epochs "
              f"(raise runner.max_epochs to train longer)")
    if D.is_dist() and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # published: SyncBN in the adapter
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None, find_unused_parameters=True)
           if D.is_dist() else model)
    sampler = DistributedSampler(train_set, D.get_world_size(), D.get_rank(), shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_size=int(cfg.data.samples_per_gpu), sampler=sampler, collate_fn=collate,
                        num_workers=usable_workers(int(cfg.data.get("workers_per_gpu", 0))))
    lr_cfg = _plain(cfg.get("lr_config") or {})
    grad_clip = (_plain(cfg.get("optimizer_config") or {})).get("grad_clip")
    ckpt_cfg = _plain(cfg.get("checkpoint_config") or {})
    eval_cfg = _plain(cfg.get("evaluation") or {})
    interval, metrics = int(eval_cfg.get("interval", 1)), tuple(eval_cfg.get("metric", ("bbox", "segm")))
    config = {**_plain(cfg), **run_description(cfg), "world_size": D.get_world_size()}
    with EpochLogger(work, start_epoch=start_epoch, wandb_project=wandb_project, wandb_group=wandb_group,
                     run_name=wandb_name, run_id=wandb_run_id, config=config) as logger:
        it = start_epoch * len(loader)
        for epoch in range(start_epoch, max_epochs):
            sampler.set_epoch(epoch)
            ddp.train()
            total, n = 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{max_epochs}", disable=not D.is_main_process())
            optimizer.zero_grad(set_to_none=True)
            for step, (images, targets) in enumerate(bar):
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * lr_factor(lr_cfg, epoch, it)
                images = [im.to(device) for im in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                # mmcv's GradientCumulativeOptimizerHook: a trailing incomplete round still updates
                update = (step + 1) % accum == 0 or step + 1 == len(loader)
                with no_sync_unless(ddp, update):
                    with autocast(device, amp_dtype):
                        losses = ddp(images, targets)
                    loss = sum(losses.values())
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"non-finite loss {loss.item()} at epoch {epoch + 1} step {step}: lower "
                                           f"optimizer.lr or set optimizer_config.grad_clip")
                    backward(loss, accum, scaler)
                if update:
                    optimizer_step(optimizer, model.parameters(), scaler=scaler,
                                   clip_grad=float(dict(grad_clip).get("max_norm", 35)) if grad_clip else None)
                it += 1
                total, n = total + loss.item(), n + 1
                bar.set_postfix(loss=f"{total / n:.3f}")
            row: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(n, 1),
                                   "lr": max(g["lr"] for g in optimizer.param_groups)}
            if (epoch + 1) % interval == 0 or epoch + 1 == max_epochs:
                res = evaluate(model, val_set, device, metrics=metrics, amp_dtype=amp_dtype)
                row.update(res)
                if D.is_main_process():
                    print(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()
                                                           if k.endswith(("mAP", "_50"))))
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "scaler": scaler.state_dict() if scaler else None, "metrics": res,
                     "config": cfg.pretty_text if hasattr(cfg, "pretty_text") else None,
                     "wandb_run_id": logger.wandb_run_id}
            save_checkpoint(work / "latest.pth", **state)
            if (epoch + 1) % int(ckpt_cfg.get("interval", 1)) == 0:
                save_checkpoint(work / f"epoch_{epoch + 1}.pth", **state)
                _prune_checkpoints(work, int(ckpt_cfg.get("max_keep_ckpts", -1)))
            logger.log(row)
            D.barrier()
    return res
