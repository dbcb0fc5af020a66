"""Data loaders for the training and evaluation scripts: a train loader whose order depends only on
``(seed, epoch)`` (so resumed and multi-process runs see the same data) and a val loader, sequential or sharded
without padding for distributed evaluation."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from atc import distributed as D
from atc.data.datasets import build_dataset
from atc.errors import ConfigError

__all__ = ["build_loaders", "build_train_sampler", "ShardSampler", "usable_workers"]


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
