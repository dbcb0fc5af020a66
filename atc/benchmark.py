"""Throughput measurement shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["measure_throughput", "synchronize"]


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    step: Callable[[], object], batch_size: int, runs: int, throw_out: float = 0.25,
    device: torch.device | str = "cpu", progress: Callable[[int], object] | None = None,
) -> float:
    """Items per second of ``step`` (one call processes ``batch_size`` items).

    The first ``int(runs * throw_out)`` calls are warm-up and not timed (as the published benchmarks do);
    at least one call is always timed. ``progress(n)`` is called after each run (e.g. a tqdm ``update``).
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if not 0 <= throw_out < 1:
        raise ValueError(f"throw_out must be in [0, 1), got {throw_out}")
    warmup = min(int(runs * throw_out), runs - 1)
    start = 0.0
    for i in range(runs):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        step()
        if progress is not None:
            progress(1)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return batch_size * (runs - warmup) / max(elapsed, 1e-12)
