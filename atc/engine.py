"""The training loop shared by ``train_deit.py``, ``train_mae.py``, ``reproduce_digits_table.py`` and (its optimiser
step) the detection trainer.

One loop for every classification setup: AMP (bf16 on CPU, fp16/bf16 on CUDA), gradient accumulation, gradient
clipping, EMA updated per optimiser step, timm schedulers stepped per epoch or per optimiser step, distillation,
multi-label (mAP) or single-label (top-1/top-5) evaluation, atomic checkpoints with every RNG state
(:mod:`atc.checkpoint`; a resumed deterministic run reproduces an uninterrupted one exactly), automatic resume,
and per-epoch logs (:class:`atc.tracking.EpochLogger`: CSV/JSONL, optional Weights & Biases).

Where the rest lives: models by name in :mod:`atc.models` (:func:`~atc.models.build_classifier`), data loaders in
:mod:`atc.data`, checkpoints in :mod:`atc.checkpoint`, the CLI error type in :mod:`atc.cli`.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from atc import distributed as D
from atc.checkpoint import load_for_resume, rng_state, save_checkpoint, set_rng_state
from atc.cli import ConfigError
from atc.tracking import EpochLogger

__all__ = [
    "amp_dtype_for", "autocast", "backward", "optimizer_step", "no_sync_unless", "train_one_epoch", "evaluate",
    "mean_average_precision", "fit", "FitConfig", "count_parameters", "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


# ------------------------------------------------------------------------------------------------------------- AMP
def amp_dtype_for(device: torch.device, use_amp: bool, amp_dtype: str | None = None) -> torch.dtype | None:
    """``None`` (full precision) unless ``use_amp``; then bf16 on CPU, fp16 (or the given dtype) on CUDA."""
    if not use_amp:
        return None
    if amp_dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if amp_dtype in ("float16", "fp16"):
        if device.type != "cuda":
            raise ConfigError("float16 autocast needs a GPU; on CPU use --amp-dtype bfloat16.")
        return torch.float16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------------------------------- train / eval
def no_sync_unless(model: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
    """Under DDP, only the micro-batch that ends an accumulation round synchronises gradients."""
    return nullcontext() if last_micro_batch or not hasattr(model, "no_sync") else model.no_sync()


def backward(loss: Tensor, accum_steps: int = 1, scaler: Any = None) -> None:
    """Backpropagate one micro-batch's share of an accumulation round (through the fp16 loss scaler if any)."""
    scaled = loss / accum_steps
    (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], *, scaler: Any = None,
                   clip_grad: float | None = None, skip_params: Sequence[nn.Parameter] = ()) -> None:
    """End an accumulation round: unscale, clip the gradient norm of ``params`` to ``clip_grad``, step (through
    the scaler, which skips steps with inf/NaN gradients) and clear the gradients. ``skip_params`` get no update
    (their gradients are dropped: frozen parts during ``--backbone_freeze_steps``)."""
    for p in skip_params:
        p.grad = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: nn.Module, loader: Iterable, criterion: Callable, optimizer: torch.optim.Optimizer,
    device: torch.device, epoch: int, *, amp_dtype: torch.dtype | None = None, scaler: Any = None,
    accum_steps: int = 1, clip_grad: float | None = None, mixup_fn: Callable | None = None,
    model_ema: Any = None, lr_scheduler: Any = None, sched_in_steps: bool = False, num_updates: int = 0,
    frozen_params: Sequence[nn.Parameter] = (), freeze_steps: int = 0, distillation: bool = False,
    progress: bool = True, max_steps: int | None = None,
) -> tuple[dict[str, float], int]:
    """One epoch. ``criterion(outputs, targets)``, or ``criterion(inputs, outputs, targets)`` when
    ``distillation``. The optimiser steps every ``accum_steps`` micro-batches (a trailing incomplete group is
    dropped so every update averages the same number of samples). ``frozen_params`` get no update during the
    first ``freeze_steps`` optimiser steps (``--backbone_freeze_steps``).

    Returns ``({"train_loss", "lr", "train_images_per_s"}, num_updates)`` with ``num_updates`` the running
    optimiser-step count; the throughput counts the images of all processes over the epoch's wall time (data
    loading included).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    if max_steps is not None and n_batches is not None:
        n_batches = min(n_batches, max_steps)
    usable = (n_batches // accum_steps) * accum_steps if n_batches is not None else None
    loss_sum, loss_count, image_count = torch.zeros((), dtype=torch.float64), 0, 0
    start = time.perf_counter()
    bar = tqdm(total=usable, desc=f"epoch {epoch}", leave=False, disable=not (progress and D.is_main_process()),
               dynamic_ncols=True)
    for i, (images, targets) in enumerate(loader):
        if usable is not None and i >= usable:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        last_micro = (i + 1) % accum_steps == 0
        with no_sync_unless(model, last_micro):
            with autocast(device, amp_dtype):
                outputs = model(images)
                loss = criterion(images, outputs, targets) if distillation else criterion(outputs, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, batch {i}; lower the learning "
                                         "rate or disable AMP.")
            backward(loss, accum_steps, scaler)
        loss_sum += loss.detach().double().cpu()
        loss_count += 1
        image_count += images.shape[0]
        if last_micro:
            optimizer_step(optimizer, model.parameters(), scaler=scaler, clip_grad=clip_grad,
                           skip_params=frozen_params if num_updates < freeze_steps else ())
            num_updates += 1
            if model_ema is not None:
                model_ema.update(unwrap(model), step=num_updates)
            if lr_scheduler is not None and sched_in_steps:
                lr_scheduler.step_update(num_updates=num_updates)
            bar.update(accum_steps)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    counts = torch.tensor([float(loss_count), float(image_count)], dtype=torch.float64)
    total = D.reduce_sum(torch.cat([loss_sum[None], counts]))
    mean_loss = (total[0] / total[1].clamp(min=1)).item()
    images_per_s = total[2].item() / max(time.perf_counter() - start, 1e-9)
    return {"train_loss": mean_loss, "lr": max(g["lr"] for g in optimizer.param_groups),
            "train_images_per_s": images_per_s}, num_updates


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes (with at least one positive) of sklearn's average precision, x100.

    ``scores (N, K)``, ``targets (N, K)`` multi-hot.
    """
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(targets[:, k], scores[:, k]) for k in range(targets.shape[1])
           if targets[:, k].sum() > 0]
    return float(np.mean(aps) * 100) if aps else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, *, multilabel: bool = False,
             amp_dtype: torch.dtype | None = None, gather: bool = False, return_outputs: bool = False,
             progress: bool = True, desc: str = "eval") -> dict[str, Any]:
    """Evaluate on ``loader``.

    Single-label: ``{"loss", "top1", "top5", "n"}`` (percent); multi-label: ``{"loss", "mAP", "n"}``. With
    ``gather`` (``--dist-eval``), each process evaluates its shard and outputs are gathered before the metrics.
    With ``return_outputs``, also ``"logits" (N, K)`` and ``"targets"`` in dataset order of the loader.
    """
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not (progress and D.is_main_process()),
                                dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(images)
        if isinstance(out, (tuple, list)):  # distilled model at eval: DeiT averages the two heads
            out = (out[0] + out[1]) / 2
        all_logits.append(out.float().cpu())
        all_targets.append(targets.cpu())
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, 1)
    targets = torch.cat(all_targets) if all_targets else torch.zeros(0, dtype=torch.long)
    if gather:
        logits = D.all_gather_cat(logits.to(device)).cpu()
        targets = D.all_gather_cat(targets.to(device)).cpu()
    result: dict[str, Any] = {"n": int(logits.shape[0])}
    if multilabel:
        from atc.losses import AsymmetricLoss

        result["loss"] = AsymmetricLoss()(logits, targets).item() / max(1, logits.shape[0])
        result["mAP"] = mean_average_precision(torch.sigmoid(logits).numpy(), targets.numpy())
    else:
        result["loss"] = torch.nn.functional.cross_entropy(logits, targets).item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        correct = topk.eq(targets.unsqueeze(1))
        result["top1"] = correct[:, 0].float().mean().item() * 100
        result["top5"] = correct.any(dim=1).float().mean().item() * 100
    if return_outputs:
        result["logits"], result["targets"] = logits, targets
    return result


# ------------------------------------------------------------------------------------------------------------ fit
@dataclass
class FitConfig:
    """Loop settings for :func:`fit` (the scripts fill it from their flags)."""

    epochs: int
    output_dir: str | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    sched_in_steps: bool = False
    multilabel: bool = False
    distillation: bool = False
    dist_eval: bool = False
    eval_before_training: bool = True
    save_more_than_best: bool = False
    freeze_steps: int = 0
    progress: bool = True
    args: dict[str, Any] = field(default_factory=dict)
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_name: str | None = None
    max_steps_per_epoch: int | None = None


def _metric(res: dict[str, Any], multilabel: bool) -> float:
    return res["mAP"] if multilabel else res["top1"]


def _best_summary(best: dict[str, Any]) -> dict[str, Any]:
    """The best checkpoint for the W&B run summary: ``best/epoch``, ``best/ema``, ``best/metric`` and its
    evaluation (``best/top1``, ``best/top5``, ``best/loss`` or ``best/mAP``...)."""
    out = {"best/epoch": best["epoch"], "best/ema": best["ema_best"], "best/metric": best["metric"]}
    out.update({f"best/{k}": v for k, v in best.get("metrics", {}).items()})
    return out


def _model_profile(model: nn.Module, dataset: Any, device: torch.device) -> dict[str, Any]:
    """Token count after every block and GFLOPs per image of ``model``, from one image of ``dataset`` (for the
    W&B run config). Empty where they cannot be measured; the RNG state is left as it was, so a resumed
    deterministic run is unaffected."""
    out: dict[str, Any] = {}
    try:
        from atc.benchmark import count_flops

        image = dataset[0][0].unsqueeze(0).to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                out["gflops_per_image"] = count_flops(model, image) / 1e9
        finally:
            model.train(was_training)
        tokens = (getattr(model, "_atc_info", None) or {}).get("tokens")
        if tokens:
            out["tokens_per_block"] = [int(t) for t in tokens]
    except Exception:  # noqa: BLE001 - optional information; the run goes on without it
        pass
    return out


def fit(cfg: FitConfig, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, criterion: Callable,
        optimizer: torch.optim.Optimizer, device: torch.device, *, lr_scheduler: Any = None, model_ema: Any = None,
        scaler: Any = None, amp_dtype: torch.dtype | None = None, mixup_fn: Callable | None = None,
        frozen_params: Sequence[nn.Parameter] = (), resume_from: str | os.PathLike | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train for ``cfg.epochs`` epochs with evaluation and checkpoints after each; resume from ``resume_from``.

    Every epoch writes ``output_dir/checkpoint.pth`` (model, model_ema, optimizer, lr_scheduler, scaler, epoch,
    num_updates, best, args, rng, wandb_run_id) atomically, a log row, and ``best_checkpoint.pth`` when the model
    or its EMA beats the best so far (``ema_best`` says which). With ``cfg.wandb_project`` the rows also go to a
    W&B run (:class:`EpochLogger`), whose summary holds the best checkpoint's metrics and whose config the
    arguments, parameter count, token counts per block and GFLOPs per image. Returns the last log row.
    """
    start_epoch, num_updates = 0, 0
    best: dict[str, Any] = {"metric": -math.inf, "epoch": -1, "ema_best": False, "metrics": {}}
    out = Path(cfg.output_dir) if cfg.output_dir else None
    wandb_run_id = None
    if resume_from is not None:
        ckpt = load_for_resume(resume_from, model, optimizer=optimizer, model_ema=model_ema, scaler=scaler,
                               lr_scheduler=lr_scheduler)
        start_epoch, num_updates = int(ckpt["epoch"]) + 1, int(ckpt.get("num_updates", 0))
        best = ckpt.get("best", best)
        wandb_run_id = ckpt.get("wandb_run_id")
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        if lr_scheduler is not None:
            # timm schedulers compute the lr from the epoch/step index; set it for where we continue.
            if cfg.sched_in_steps:
                lr_scheduler.step_update(num_updates=num_updates)
            else:
                lr_scheduler.step(start_epoch)
        log(f"resumed from {resume_from}: continuing at epoch {start_epoch} (update {num_updates})")
    config = {**cfg.args, "num_params": count_parameters(model), "world_size": D.get_world_size()}
    with EpochLogger(out, start_epoch=start_epoch, wandb_project=cfg.wandb_project, wandb_group=cfg.wandb_group,
                     run_name=cfg.wandb_name, run_id=wandb_run_id, config=config) as logger:
        if logger.tracking:
            logger.update_config(_model_profile(unwrap(model), getattr(val_loader, "dataset", None), device))
            if best["epoch"] >= 0:  # a resumed run: its summary starts from the best so far
                logger.summary(_best_summary(best))
        eval_kw = dict(multilabel=cfg.multilabel, amp_dtype=amp_dtype, gather=cfg.dist_eval, progress=cfg.progress)
        if cfg.eval_before_training and start_epoch == 0 and cfg.epochs > 0:
            res = evaluate(model, val_loader, device, desc="eval (before training)", **eval_kw)
            log(f"before training: {_fmt(res, cfg.multilabel)}")
        row: dict[str, Any] = {}
        sampler = getattr(train_loader, "sampler", None)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            train_stats, num_updates = train_one_epoch(
                model, train_loader, criterion, optimizer, device, epoch, amp_dtype=amp_dtype, scaler=scaler,
                accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, mixup_fn=mixup_fn, model_ema=model_ema,
                lr_scheduler=lr_scheduler, sched_in_steps=cfg.sched_in_steps, num_updates=num_updates,
                frozen_params=frozen_params, freeze_steps=cfg.freeze_steps, distillation=cfg.distillation,
                progress=cfg.progress, max_steps=cfg.max_steps_per_epoch)
            if lr_scheduler is not None and not cfg.sched_in_steps:
                lr_scheduler.step(epoch + 1)
            res = evaluate(model, val_loader, device, desc=f"eval epoch {epoch}", **eval_kw)
            row = {"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in res.items()}, "num_updates": num_updates}
            candidates = [(_metric(res, cfg.multilabel), False, res)]
            if model_ema is not None:
                res_ema = evaluate(model_ema.module, val_loader, device, desc=f"eval EMA epoch {epoch}", **eval_kw)
                row.update({f"ema_{k}": v for k, v in res_ema.items()})
                candidates.append((_metric(res_ema, cfg.multilabel), True, res_ema))
            metric, is_ema, best_res = max(candidates, key=lambda c: c[0])
            improved = metric > best["metric"]
            if improved:
                best = {"metric": metric, "epoch": epoch, "ema_best": is_ema,
                        "metrics": {k: v for k, v in best_res.items() if k != "n"}}
            row.update(best_metric=best["metric"], best_epoch=best["epoch"], epoch_time=time.time() - t0)
            if out is not None:
                ema_state = model_ema.module.state_dict() if model_ema is not None else None
                state = dict(model=unwrap(model).state_dict(), model_ema=ema_state, optimizer=optimizer.state_dict(),
                             lr_scheduler=lr_scheduler.state_dict() if lr_scheduler is not None else None,
                             scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch,
                             num_updates=num_updates, best=best, args=cfg.args, rng=rng_state(),
                             wandb_run_id=logger.wandb_run_id)
                if improved:
                    save_checkpoint(out / "best_checkpoint.pth", model=ema_state if is_ema else state["model"],
                                    ema_best=is_ema, epoch=epoch, metric=metric, args=cfg.args)
                if cfg.save_more_than_best:
                    save_checkpoint(out / f"checkpoint_epoch{epoch}.pth", **state)
                # Written last: a crash before this line redoes the epoch; the previous file stays valid.
                save_checkpoint(out / "checkpoint.pth", **state)
            logger.log(row)
            if improved:
                logger.summary(_best_summary(best))
            log(f"epoch {epoch}: train_loss {train_stats['train_loss']:.4f} lr {train_stats['lr']:.2e} | "
                f"{_fmt(res, cfg.multilabel)}" + (f" | EMA {_fmt(res_ema, cfg.multilabel)}" if model_ema else "")
                + f" | best {best['metric']:.2f} (epoch {best['epoch']}{', EMA' if best['ema_best'] else ''})")
            D.barrier()
    return row


def _fmt(res: dict[str, Any], multilabel: bool) -> str:
    if multilabel:
        return f"mAP {res['mAP']:.2f} loss {res['loss']:.4f}"
    return f"top1 {res['top1']:.2f} top5 {res['top5']:.2f} loss {res['loss']:.4f}"
