"""Shared logic of the ViT patchers (timm, torchvision): r schedules, per-forward state, method dispatch.

A patched model carries one :class:`MergeState` that every patched block reads and updates during a forward
pass: the token sizes, the source map, the resolved number of tokens to remove per block and the token counts
reached. The patchers know where in a block to merge; *how* to merge is always :func:`atc.merge.merge_by_method`.

``model.r`` (set after patching) may be

- an ``int``: remove that many tokens in every block,
- a per-block ``list``/``tuple`` of ints (length = number of blocks),
- ``(r, "constant" | "decrease")``: the off-the-shelf/MAE schedules (REFERENCE §2; ``decrease`` ramps
  linearly from ``2r`` down to ``0``),
- a :class:`KeepRateSchedule` (what the registered ``atc_*``/``tome_*`` models use): keep
  ``int(N_patches * keep_rate^(idx+1))`` unprotected tokens after reduction location ``idx``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from atc.cluster import validate_linkage
from atc.merge import MERGE_METHODS, Merge, init_token_map, max_removable, merge_by_method

__all__ = [
    "METRICS",
    "KeepRateSchedule",
    "MergeState",
    "parse_r",
    "check_options",
    "weighted_pool",
]

#: Which tensor the merge metric is computed from: attention keys / queries / values averaged over heads
#: (keys is the paper's choice), or the block input ``x``.
METRICS = ("keys", "queries", "values", "x")

#: Methods that run *before* a block on its input (REFERENCE §1); the others merge inside the block.
PRE_BLOCK_METHODS = ("kmedoids", "dpcknn")


@dataclass(frozen=True)
class KeepRateSchedule:
    """Reduce at ``reduction_loc`` (0-indexed blocks) keeping ``int(N * keep_rate[idx] ** (idx + 1))`` tokens.

    ``N`` is the number of unprotected (patch) tokens entering the model; ``keep_rate`` is one float or one
    float per location. With a per-location list, location ``idx`` keeps ``N * prod(keep_rate[:idx+1])``.
    """

    reduction_loc: tuple[int, ...]
    keep_rate: tuple[float, ...]

    @staticmethod
    def build(reduction_loc: Sequence[int], keep_rate: float | Sequence[float], depth: int) -> "KeepRateSchedule":
        """Validate and build; raises ``ValueError`` naming the bad value (before any model is built)."""
        locs = [int(v) for v in reduction_loc]
        if sorted(set(locs)) != locs:
            raise ValueError(f"reduction_loc must be strictly increasing block indices, got {list(reduction_loc)}")
        bad = [v for v in locs if not 0 <= v < depth]
        if bad:
            raise ValueError(f"reduction_loc {bad} outside the model's {depth} blocks (valid: 0..{depth - 1})")
        rates = [float(keep_rate)] * len(locs) if isinstance(keep_rate, (int, float)) else [float(v) for v in keep_rate]
        if len(rates) != len(locs):
            raise ValueError(
                f"keep_rate has {len(rates)} values but reduction_loc has {len(locs)} locations: give one "
                f"keep rate or one per location"
            )
        for v in rates:
            if not (0.0 < v <= 1.0) or math.isnan(v):
                raise ValueError(f"keep_rate must be in (0, 1] (fraction of tokens kept), got {v}")
        return KeepRateSchedule(tuple(locs), tuple(rates))

    def kept(self, num_patches: int) -> list[int]:
        """Unprotected token count after each location, e.g. ``[98, 49, 24]`` for N=196, keep 0.5."""
        out, frac = [], 1.0
        for rate in self.keep_rate:
            frac *= rate
            # round away float noise such as 0.7**3 = 0.34299999... before int() truncates (REFERENCE §2 table)
            out.append(int(round(num_patches * frac, 6)))
        return out


def parse_r(r: Any, depth: int) -> list[int] | KeepRateSchedule:
    """Normalise ``model.r`` to a per-block list of ints (or keep a :class:`KeepRateSchedule`)."""
    if isinstance(r, KeepRateSchedule):
        return r
    if isinstance(r, bool):
        raise TypeError(f"model.r must be an int, a list of ints or (r, schedule); got {r!r}")
    if isinstance(r, int):
        out = [r] * depth
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], str):
        base, sched = r
        if not isinstance(base, int) or isinstance(base, bool):
            raise TypeError(f"model.r schedule needs an int r, got {base!r}")
        if sched == "constant":
            out = [base] * depth
        elif sched == "decrease":
            # linear ramp from 2r to 0 (ToMe's parse_r with inflection -0.5): r=16, 12 layers -> 32,29,...,2,0
            start = 2 * base
            step = -start / (depth - 1) if depth > 1 else 0.0
            out = [int(start + step * i) for i in range(depth)]
        else:
            raise ValueError(f"unknown r schedule {sched!r}: use 'constant' or 'decrease'")
    elif isinstance(r, (list, tuple)):
        out = [int(v) for v in r]
        if len(out) != depth:
            raise ValueError(f"model.r list has {len(out)} entries but the model has {depth} blocks")
    else:
        raise TypeError(f"model.r must be an int, a list of ints or (r, 'constant'|'decrease'); got {r!r}")
    if any(v < 0 for v in out):
        raise ValueError(f"model.r must be non-negative, got {out}")
    return out


def check_options(method: str, linkage: str, metric: str) -> None:
    """Fail early (at patch time) on an unknown method, linkage or metric."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {sorted(MERGE_METHODS)}")
    validate_linkage(linkage)
    if metric not in METRICS:
        raise ValueError(f"unknown merge metric {metric!r}: choose one of {METRICS}")


@dataclass
class MergeState:
    """Options fixed at patch time plus the state of the current forward pass.

    After a forward, ``tokens`` holds the token count (incl. prefix tokens) after each block, ``size``
    ``(B, T, 1)`` the number of original tokens in each output token, and with ``trace_source`` the
    ``token_map (B, N)``: for each input token (prefix tokens included) the output slot holding it.
    """

    method: str = "atc"
    linkage: str = "average"
    prop_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"
    metric: str = "keys"
    protected: int = 1
    depth: int = 12
    r: Any = 0
    # per-forward
    r_list: list[int] = field(default_factory=list)
    size: Tensor | None = None
    token_map: Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    requested: list[int] = field(default_factory=list)
    capped: bool = False
    warned: bool = False
    attn_received: Tensor | None = None
    targets: dict[int, int] = field(default_factory=dict)

    def reset(self, num_tokens: int, batch_size: int, device: torch.device) -> None:
        """Start a forward with ``num_tokens`` tokens (prefix included) per sample."""
        self.size = None
        self.attn_received = None
        self.tokens = []
        self.requested = []
        self.capped = False
        parsed = parse_r(self.r, self.depth)
        self.targets = {}
        if isinstance(parsed, KeepRateSchedule):
            # targets are absolute counts: if a step was capped (ToMe), later steps aim at the planned count
            # from wherever the previous step actually got to
            self.targets = dict(zip(parsed.reduction_loc, parsed.kept(num_tokens - self.protected)))
            self.r_list = self._schedule_to_r(parsed, num_tokens - self.protected)
        else:
            self.r_list = parsed
        self.token_map = init_token_map(batch_size, num_tokens, device) if self.trace_source else None

    def _schedule_to_r(self, sched: KeepRateSchedule, num_patches: int) -> list[int]:
        out = [0] * self.depth
        current = num_patches
        for loc, kept in zip(sched.reduction_loc, sched.kept(num_patches)):
            out[loc] = max(current - kept, 0)
            current = kept
        return out

    def block_r(self, index: int, num_tokens: int) -> int:
        """Tokens to remove in block ``index``, capped (with a record of it) at what the method can do."""
        want = self.r_list[index] if index < len(self.r_list) else 0
        if index in self.targets:
            want = max(num_tokens - self.protected - self.targets[index], 0)
        limit = max_removable(self.method, num_tokens, self.protected)
        self.requested.append(want)
        if want > limit:
            self.capped = True
            return limit
        return want

    @property
    def needs_attention_weights(self) -> bool:
        return self.method == "kmedoids"

    def wants_attention_at(self, index: int) -> bool:
        """K-Medoids weights tokens by the attention they received in the block before a reduction."""
        return self.needs_attention_weights and index + 1 < len(self.r_list) and self.r_list[index + 1] > 0

    def attention_bias(self, dtype: torch.dtype) -> Tensor | None:
        """``log(size)`` over keys ``(B, 1, 1, T)`` for proportional attention, or ``None``."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size.to(dtype).log()[:, None, None, :, 0]

    def merge(
        self, index: int, x: Tensor, metric: Tensor, token_weight: Tensor | None = None
    ) -> tuple[Tensor, Merge | None]:
        """Remove ``r`` tokens from ``x (B, T, C)`` using ``metric (B, T, C')``; returns the merged ``x``.

        Sizes and the source map are updated; ``token_weight (B, T, 1)`` multiplies the sizes as merge
        weights (DPC-KNN's learnable weights).
        """
        t = x.shape[1]
        r = self.block_r(index, t)
        if r <= 0:
            self.tokens.append(t)
            return x, None
        options: dict[str, Any] = {"linkage": self.linkage, "backend": self.backend}
        if self.method == "kmedoids" and self.attn_received is not None:
            options["weights"] = self.attn_received
        with torch.no_grad():
            m = merge_by_method(self.method, metric.detach(), r, self.protected, **options)
        size = self.size if self.size is not None else x.new_ones(x.shape[0], t, 1)
        weight = size if token_weight is None else size * token_weight
        x = m.merge(x, weight.to(x.dtype))
        self.size = m.merge_size(size)
        if self.token_map is not None:
            self.token_map = m.merge_token_map(self.token_map)
        self.tokens.append(m.num_out)
        return x, m

    def finish(self) -> None:
        """Warn once per model when the method could not remove what was asked (ToMe's 50% cap)."""
        if self.capped and not self.warned:
            self.warned = True
            why = ("bipartite matching removes at most half of the unprotected tokens per block"
                   if self.method == "tome" else "at least one unprotected token must remain")
            warnings.warn(
                f"{self.method} cannot remove the requested number of tokens: asked to remove "
                f"{self.requested} per block, reached token counts {self.tokens} (incl. {self.protected} "
                f"protected): {why}.",
                stacklevel=5,
            )

    def info(self) -> dict[str, Any]:
        """The documented ``model._atc_info`` view of the last forward pass."""
        return {
            "tokens": list(self.tokens),
            "requested_r": list(self.requested),
            "r": list(self.r_list),
            "size": self.size,
            "token_map": self.token_map,
            "protected": self.protected,
            "capped": self.capped,
        }


def weighted_pool(x: Tensor, size: Tensor | None, pool_type: str, num_prefix: int, include_prefix: bool) -> Tensor:
    """Global pooling of merged tokens ``(B, T, C) -> (B, C)``: averages are size-weighted.

    ``sum(x * size) / sum(size)`` over the pooled tokens reproduces the mean over the original tokens when
    each merged token is the mean of its members (REFERENCE defect 8).
    """
    tokens = x if include_prefix else x[:, num_prefix:]
    if size is None:
        w = tokens.new_ones(tokens.shape[0], tokens.shape[1], 1)
    else:
        w = (size if include_prefix else size[:, num_prefix:]).to(tokens.dtype)
    avg = (tokens * w).sum(dim=1) / w.sum(dim=1)
    if pool_type == "avg":
        return avg
    if pool_type == "max":
        return tokens.amax(dim=1)
    if pool_type == "avgmax":
        return 0.5 * (tokens.amax(dim=1) + avg)
    raise ValueError(f"pooling {pool_type!r} is not supported with token merging")


def swap_class(module: nn.Module, methods: dict[str, Any]) -> None:
    """Give ``module`` a subclass of its class overriding ``methods``; :func:`remove_patch` restores it."""
    cls = module.__class__
    module._atc_orig_class = cls
    module.__class__ = type(f"ATC{cls.__name__}", (cls,), methods)


_PATCH_ATTRS = ("_atc_orig_class", "_atc_state", "_atc_index", "_atc_metric", "_atc_info", "_atc_patch_module", "r")


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo a ViT patch (timm or torchvision): restore the original classes and drop every attribute and
    submodule the patch added."""
    for module in list(model.modules()):
        orig = module.__dict__.get("_atc_orig_class")
        if orig is not None:
            module.__class__ = orig
        for name in _PATCH_ATTRS:
            if name in module.__dict__:
                delattr(module, name)
        if "atc_token_score" in module._modules:
            del module._modules["atc_token_score"]
    return model
