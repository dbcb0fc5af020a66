"""torch.distributed helpers: ``torchrun`` launch detection, process-group setup (NCCL on GPU, gloo on CPU),
rank-0 printing, and cross-process reductions for evaluation."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_dist", "get_rank", "get_world_size", "is_main_process", "barrier",
           "all_gather_cat", "reduce_sum", "cleanup"]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto", dist_url: str = "env://", backend: str | None = None) -> torch.device:
    """Join the process group when launched by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set); return the device.

    Single-process runs (no RANK in the environment) return the device without creating a group.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world_size <= 1:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not is_dist():
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=int(os.environ["RANK"]))
    return dev


def barrier() -> None:
    if is_dist():
        dist.barrier()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (returns a new tensor; identity without a process group)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t (N_i, ...)`` from every process along dim 0 (sizes may differ between processes)."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = t.new_zeros((max_n, *t.shape[1:]))
    padded[: t.shape[0]] = t
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
