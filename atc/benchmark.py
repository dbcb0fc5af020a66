"""Measurements shared by the benchmark scripts: throughput, FLOPs, peak memory, compiling for speed."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["measure_throughput", "synchronize", "count_flops", "tokens_per_block", "peak_memory_mib", "compile_model",
           "COMPILE_MODES"]

#: ``--compile`` choices of the benchmarks: ``none`` runs eagerly, the others are ``torch.compile`` modes
#: (``default`` is its default mode).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


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


def _sdpa_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *args: object,
                out_shape: object = None, **kwargs: object) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, inputs: Tensor) -> int:
    """FLOPs of one eager forward of ``model`` on ``inputs`` (multiply-add = 2 FLOPs), no gradients.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the operators actually run, so a token-reduced
    model is counted at the token counts it reaches: matmuls, convolutions and attention (torch has no formula
    for the CPU flash-attention kernel; it is counted here like the GPU ones). Elementwise work, sorting and the
    clustering loop itself are not counted (their matmuls, e.g. cosine similarities, are).
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(inputs)
    return int(counter.get_total_flops())


def tokens_per_block(model: nn.Module) -> list[int]:
    """Token count after every block (prefix tokens included) in ``model``'s last forward: a patched model's
    ``_atc_info["tokens"]``, or the constant count of an unpatched timm ViT."""
    info = getattr(model, "_atc_info", None)
    if info:
        return list(info["tokens"])
    return [model.patch_embed.num_patches + model.num_prefix_tokens] * len(model.blocks)


def peak_memory_mib(step: Callable[[], object], device: torch.device | str, weights: nn.Module | None = None) -> float:
    """Peak CUDA memory of one call of ``step`` in MiB: what it allocates on top of the memory already in use
    (activations, workspace) plus the parameters and buffers of ``weights``; NaN off CUDA.

    Memory that stays allocated between calls (e.g. the pool of CUDA graphs recorded by
    ``torch.compile(mode="reduce-overhead")``) is in use before the call and therefore not counted.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return math.nan
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - before
    if weights is not None:
        extra += sum(t.numel() * t.element_size() for t in (*weights.parameters(), *weights.buffers()))
    return extra / 2**20


def compile_model(model: nn.Module, mode: str, fullgraph: bool = False) -> Callable[..., object]:
    """``model`` itself for ``mode="none"``, else ``torch.compile(model, mode=...)`` (``"default"``: torch's
    default mode) with shapes specialised per input size (each batch size its own graph, as CUDA graphs need).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, fullgraph=fullgraph, dynamic=False)
