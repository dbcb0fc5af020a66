"""Training and evaluation engine shared by ``train_deit.py``, ``train_mae.py`` and ``reproduce_digits_table.py``.

One loop for every setup: AMP (bf16 on CPU, fp16/bf16 on CUDA), gradient accumulation, gradient clipping,
EMA updated per optimiser step, timm schedulers stepped per epoch or per optimiser step, distillation,
multi-label (mAP) or single-label (top-1/top-5) evaluation, atomic checkpoints with every RNG state (a resumed
deterministic run reproduces an uninterrupted one exactly), automatic resume, per-epoch CSV/JSONL logs and
optional Weights & Biases logging (:mod:`atc.tracking`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from atc import distributed as D
from atc.cluster import LINKAGES
from atc.merge import validate_keep_rate
from atc.utils import atomic_save, atomic_write_text

if TYPE_CHECKING:
    from atc.tracking import WandbRun

__all__ = [
    "REDUCTION_PREFIXES", "LINKAGES", "ConfigError", "build_classifier", "parse_model_kwargs", "validate_reduction",
    "load_pretrained", "amp_dtype_for", "autocast", "train_one_epoch", "evaluate", "mean_average_precision",
    "rng_state", "set_rng_state", "save_checkpoint", "load_for_resume", "find_resume", "EpochLogger", "fit",
    "FitConfig", "ShardSampler", "build_train_sampler", "count_parameters", "unwrap",
]

# Registered model families (atc.models) that take token-reduction kwargs.
REDUCTION_PREFIXES = ("atc_", "tome_", "kmedoids_", "dpcknn_")


class ConfigError(ValueError):
    """A bad command-line option; raised before any heavy work with a message naming the fix."""


# ----------------------------------------------------------------------------------------------------------- model
def parse_model_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
    """``["embed_dim=64", "depth=4"]`` -> ``{"embed_dim": 64, "depth": 4}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--model-kwargs expects key=value pairs, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def is_reduction_model(name: str) -> bool:
    return name.startswith(REDUCTION_PREFIXES)


def validate_reduction(keep_rate: float | Sequence[float] | None, reduction_loc: Sequence[int] | None,
                       linkage: str | None, depth: int | None = None) -> None:
    """Check reduction flags; raise :class:`ConfigError` with the fix. ``depth`` = number of blocks if known."""
    rates = keep_rate if isinstance(keep_rate, (list, tuple)) else [keep_rate]
    for kr in rates:
        if kr is not None:
            try:
                validate_keep_rate(kr, "--reduction_ratio/--keep_rate")
            except ValueError as exc:
                raise ConfigError(f"{exc}.") from None
    if linkage is not None and linkage not in LINKAGES:
        raise ConfigError(f"unknown linkage {linkage!r}; choose one of {', '.join(sorted(LINKAGES))}.")
    for loc in reduction_loc or []:
        if loc < 0 or (depth is not None and loc >= depth):
            raise ConfigError(f"reduction location {loc} is outside the model's blocks 0..{(depth or 1) - 1} "
                              "(--reduction_loc is 0-indexed).")


def build_classifier(
    model_name: str, num_classes: int, img_size: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    reduction_loc: Sequence[int] | None = None, keep_rate: float | None = None, linkage: str = "average",
    proportional_attn: bool = False, model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create a (randomly initialised) classifier by registered timm name.

    ``atc_/tome_/kmedoids_/dpcknn_*`` names (registered by :mod:`atc.models`) receive the reduction kwargs;
    plain timm names (``deit_*``, ``vit_*``) do not. Raises :class:`ConfigError` for unknown names or
    reduction locations beyond the model's depth.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    reduction: dict[str, Any] = {}
    if is_reduction_model(model_name):
        try:
            import atc.models  # noqa: F401  (registers the reduction models with timm)
        except ImportError as exc:
            raise ConfigError(f"model {model_name!r} needs atc.models, which could not be imported: {exc}") from exc
        validate_reduction(keep_rate, reduction_loc, linkage if model_name.startswith("atc_") else None)
        reduction = dict(reduction_loc=list(reduction_loc if reduction_loc is not None else [3, 6, 9]),
                         keep_rate=1.0 if keep_rate is None else keep_rate, linkage=linkage,
                         proportional_attn=proportional_attn)
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown model {model_name!r}. Examples: {', '.join(close) or 'deit_tiny_patch16_224'}; "
                          "token-reduction models: atc_/tome_/kmedoids_/dpcknn_{tiny,small,base}_patch16_224.")
    depth = kwargs.get("depth")
    if depth is not None and reduction_loc and reduction:
        validate_reduction(None, reduction_loc, None, depth)
    common = dict(pretrained=False, num_classes=num_classes, img_size=img_size, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate)
    try:
        if reduction and ARCH_KWARGS & set(kwargs):
            # The registered names fix the DeiT size; a custom architecture (tests, the digits table) is the
            # same timm DeiT with the same patch applied through the public atc.patch API.
            import atc.patch
            from atc.patch.common import KeepRateSchedule

            method, size = model_name.split("_")[:2]
            model = timm.create_model(f"deit_{size}_patch16_224", **common, **kwargs)
            atc.patch.timm(model, method=method, linkage=reduction["linkage"],
                           prop_attn=reduction["proportional_attn"])
            model.r = model.keep_schedule = KeepRateSchedule.build(reduction["reduction_loc"], reduction["keep_rate"],
                                                                   len(model.blocks))
        else:
            model = timm.create_model(model_name, **common, **reduction, **kwargs)
    except (ValueError, AssertionError, TypeError) as exc:
        raise ConfigError(f"cannot build {model_name!r} with {kwargs}: {exc}") from exc
    return model


# timm kwargs that change a registered model's architecture (size) rather than its behaviour.
ARCH_KWARGS = {"embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio"}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, interpolate_pos: bool = True,
                    drop_mismatched_head: bool = True, use_ema: bool | None = None) -> list[str]:
    """Load weights for fine-tuning (DeiT's ``--finetune``): the position embedding is resampled (bicubic) to the
    model's grid, and a classifier head of a different shape is dropped. Returns the missing keys.

    The weights are picked from the file by :func:`atc.checkpoint.state_dict_from_checkpoint` (the EMA weights
    of a ``best_checkpoint.pth`` whose ``ema_best`` is set, else ``model``, ...; ``use_ema`` as there).
    Raises :class:`ConfigError` if the file is missing or its weights do not fit the architecture.
    """
    from atc.checkpoint import CheckpointError, read_checkpoint, resample_pos_embed, state_dict_from_checkpoint

    if not Path(path).is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist.")
    try:
        state = dict(state_dict_from_checkpoint(read_checkpoint(path), use_ema=use_ema, source=str(path)))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    own = model.state_dict()
    if interpolate_pos:
        # DeiT's fine-tuning rule: plain bicubic, no antialiasing when shrinking
        resample_pos_embed(model, state, antialias=False)
    if drop_mismatched_head:
        for key in [k for k in state if k.startswith(("head.", "head_dist."))]:
            if key in own and state[key].shape != own[key].shape:
                del state[key]
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if bad:
        raise ConfigError(f"checkpoint '{path}' does not fit the model architecture: shape mismatch for "
                          f"{bad[:5]} (e.g. {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}). "
                          "Build the model that produced it (--model, --model-kwargs).")
    result = model.load_state_dict(state, strict=False)
    if len(result.unexpected_keys) > len(own) // 2:
        raise ConfigError(f"checkpoint '{path}' does not match the model: {len(result.unexpected_keys)} "
                          f"unexpected keys, e.g. {result.unexpected_keys[:3]}.")
    return list(result.missing_keys)


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


# ----------------------------------------------------------------------------------------------------- samplers
class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r+W, r+2W, ... (exact metrics after gather)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def build_train_sampler(dataset: Dataset, seed: int, repeated_aug: bool = False, num_repeats: int = 3) -> Sampler:
    """Shuffling sampler whose order depends only on ``(seed, epoch)`` (call ``set_epoch``), so resumed and
    multi-process runs see the same data; each process gets its interleaved share of the global order."""
    from torch.utils.data import DistributedSampler

    world, rank = D.get_world_size(), D.get_rank()
    if repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=num_repeats)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


# --------------------------------------------------------------------------------------------------- train / eval
def _set_requires_grad_none(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


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
        sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                outputs = model(images)
                loss = criterion(images, outputs, targets) if distillation else criterion(outputs, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, batch {i}; lower the learning "
                                         "rate or disable AMP.")
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().double().cpu()
        loss_count += 1
        image_count += images.shape[0]
        if last_micro:
            if num_updates < freeze_steps:
                _set_requires_grad_none(frozen_params)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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


# ------------------------------------------------------------------------------------------------- checkpointing
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Atomically save a checkpoint dict (only on the main process); returns the path."""
    if D.is_main_process():
        atomic_save(state, path)
    return Path(path)


def find_resume(resume: str | None, output_dir: str | os.PathLike | None) -> Path | None:
    """``--resume PATH`` if given (must exist), else ``output_dir/checkpoint.pth`` if present, else None."""
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(f"--resume '{resume}' does not exist.")
        return Path(resume)
    if output_dir and (Path(output_dir) / "checkpoint.pth").is_file():
        return Path(output_dir) / "checkpoint.pth"
    return None


def load_for_resume(path: str | os.PathLike, model: nn.Module, *, optimizer: Any = None, model_ema: Any = None,
                    scaler: Any = None, lr_scheduler: Any = None) -> dict[str, Any]:
    """Restore model/EMA/optimiser/scaler/scheduler states from a training checkpoint; return the checkpoint
    (``epoch`` = last finished epoch, ``num_updates``, ``best``, ``rng``...). RNG states are restored by
    :func:`fit` after the data loaders are built."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConfigError(f"'{path}' is not a training checkpoint (no 'model' entry).")
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"checkpoint '{path}' does not fit this model (was it trained with other --model / "
                          f"--model-kwargs / --input-size?): {str(exc).splitlines()[0]}") from exc
    if model_ema is not None and ckpt.get("model_ema") is not None:
        model_ema.module.load_state_dict(ckpt["model_ema"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    return ckpt


# -------------------------------------------------------------------------------------------------------- logging
class EpochLogger:
    """Per-epoch rows to ``log.csv`` and ``log.jsonl`` in ``output_dir`` (always), and to Weights & Biases when
    a project is given (:mod:`atc.tracking`: offline unless ``WANDB_MODE`` says otherwise; a wandb failure is
    reported once and never stops training).

    ``run_id`` continues that W&B run (the id stored in the checkpoint being resumed). Without it, the id kept in
    ``output_dir`` is continued when resuming (``start_epoch > 0``) or when no epoch was logged yet (a run
    killed in its first epoch); otherwise a new W&B run starts.
    """

    def __init__(self, output_dir: str | os.PathLike | None, *, start_epoch: int = 0, wandb_project: str | None = None,
                 wandb_group: str | None = None, config: dict[str, Any] | None = None,
                 run_name: str | None = None, run_id: str | None = None) -> None:
        self.dir = Path(output_dir) if output_dir else None
        self.rows: list[dict[str, Any]] = []
        self.tracker: WandbRun | None = None
        if not D.is_main_process():
            return
        logged_before = False
        if self.dir is not None and (self.dir / "log.jsonl").is_file():
            # Keep the rows of finished epochs from the run being resumed; a killed epoch is redone.
            for line in (self.dir / "log.jsonl").read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    logged_before = True
                    if row.get("epoch", -1) < start_epoch:
                        self.rows.append(row)
        if wandb_project:
            from atc.tracking import WandbRun, read_run_id

            if run_id is None and (start_epoch > 0 or not logged_before):
                run_id = read_run_id(self.dir)
            name = run_name or (self.dir.resolve().name if self.dir is not None else None)
            self.tracker = WandbRun(wandb_project, group=wandb_group, name=name, config=config, folder=self.dir,
                                    run_id=run_id)

    @property
    def tracking(self) -> bool:
        """Whether rows also go to a W&B run."""
        return self.tracker is not None and self.tracker.active

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id (stored in checkpoints so that a resumed training continues the run), or None."""
        return self.tracker.id if self.tracker is not None else None

    def log(self, row: dict[str, Any]) -> None:
        if not D.is_main_process():
            return
        self.rows.append(row)
        if self.dir is not None:
            from atc.utils import write_csv

            atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.dir / "log.jsonl")
            write_csv(self.rows, self.dir / "log.csv")
        if self.tracker is not None:
            self.tracker.log(row, step=row.get("epoch"))

    def summary(self, values: dict[str, Any]) -> None:
        """Run-summary values of the W&B run (e.g. the best checkpoint's metrics); nothing without one."""
        if self.tracker is not None:
            self.tracker.summary(values)

    def update_config(self, values: dict[str, Any]) -> None:
        """Add values to the W&B run's config; nothing without one."""
        if self.tracker is not None:
            self.tracker.update_config(values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run, if any (``exit_code`` != 0 marks it failed)."""
        if self.tracker is not None:
            self.tracker.finish(exit_code)

    def __enter__(self) -> "EpochLogger":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


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


# --------------------------------------------------------------------------------------------------------- loaders
def usable_workers(requested: int) -> int:
    """Data-loader workers: the requested count (the published default is 10), capped at the CPUs this process
    may use, since more only slows a small machine down."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(requested, cpus))


def build_loaders(dataset: str, root: str | None, input_size: int, batch_size: int, *, num_workers: int = 0,
                  seed: int = 0, repeated_aug: bool = False, dist_eval: bool = False, pin_mem: bool = True,
                  train: bool = True, eval_batch_size: int | None = None, crop_pct: float | None = None,
                  **train_transform: Any) -> tuple[DataLoader | None, DataLoader, Any]:
    """Train loader (sharded, order fixed by ``(seed, epoch)``, drop_last) and val loader (sequential, or
    sharded without padding under ``dist_eval``). Returns ``(train_loader or None, val_loader, info)``."""
    from atc.data import build_dataset

    num_workers = usable_workers(num_workers)
    common = {"crop_pct": crop_pct} if crop_pct else {}
    ds_val, info = build_dataset(dataset, root, "val", input_size, is_train=False, **common)
    val_sampler = (ShardSampler(ds_val, D.get_world_size(), D.get_rank()) if dist_eval
                   else torch.utils.data.SequentialSampler(ds_val))
    pin = pin_mem and torch.cuda.is_available()
    val_loader = DataLoader(ds_val, batch_size=eval_batch_size or int(1.5 * batch_size), sampler=val_sampler,
                            num_workers=num_workers, pin_memory=pin, drop_last=False)
    train_loader = None
    if train:
        ds_train, _ = build_dataset(dataset, root, "train", input_size, is_train=True, **common, **train_transform)
        if len(ds_train) < batch_size * D.get_world_size():
            raise ConfigError(f"the training set has {len(ds_train)} images, fewer than one global batch "
                              f"({batch_size} x {D.get_world_size()}); lower the batch size.")
        sampler = build_train_sampler(ds_train, seed, repeated_aug=repeated_aug)
        train_loader = DataLoader(ds_train, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                  pin_memory=pin, drop_last=True)
    return train_loader, val_loader, info


# ------------------------------------------------------------------------------------------------------------ CLI
def run_cli(main: Callable[[Any], Any], parser: Any, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``parser``, run ``main(args)``; a :class:`ConfigError` or a dataset error becomes one
    ``error: ...`` line on stderr and exit code 2 instead of a traceback."""
    import sys

    from atc.data import DatasetError

    args = parser.parse_args(argv)
    try:
        main(args)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
