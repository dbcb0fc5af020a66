"""Shared logic of the ViT patchers (timm, torchvision): r schedules, per-forward state, method dispatch.

A patched model carries one :class:`MergeState` that every patched block reads and updates during a forward
pass: the token sizes, the source map, the resolved number of tokens to remove per block and the token counts
reached. The patchers know where in a block to merge; *how* to merge is always :func:`atc.merge.merge_by_method`.

Every token count of a forward is decided before the blocks run, from ``model.r`` and the number of input
tokens (:func:`plan_reduction`), never read from a tensor: the patched forward has static shapes, needs no host
synchronisation, and ``torch.compile`` traces it (see docs/vit.md). Patched modules of one original class share
one patched class (:func:`patched_class`), so a compiled model compiles each block type once.

``model.r`` (set after patching) may be

- an ``int``: remove that many tokens in every block,
- a per-block ``list``/``tuple`` of ints (length = number of blocks),
- ``(r, "constant" | "decrease")``: the schedules of the paper's off-the-shelf and MAE experiments
  (``decrease`` ramps linearly from ``2r`` down to ``0``, as ToMe's published ``r`` schedules do),
- a :class:`KeepRateSchedule` (what the registered ``atc_*``/``tome_*`` models use): keep
  ``int(N_patches * keep_rate^(idx+1))`` unprotected tokens after reduction location ``idx``.

Names: the library calls proportional attention ``proportional_attn`` everywhere; the public patch functions
also accept ToMe's spelling ``prop_attn=`` (``tome.patch.timm(model, prop_attn=True)``), mapped to it in one
place, :func:`resolve_proportional_attn`.

Padded batches (NaFlexViT's patch masks, a ``transformers`` attention mask): the patcher passes the padding mask
``valid (B, N)`` to the first block (:meth:`MergeState.start`); every merge keeps padding out of real clusters
(:mod:`atc.merge`) and hands the mask of its output slots to the next block. Padding tokens have size 0, so
``log(size)`` masks them as keys in proportional attention (without it the blocks add the same mask with 0 for
real tokens), size-weighted pooling ignores them, and a merged block's attention never sees them.

Gradient checkpointing: a checkpointed block runs again during the backward pass, when the shared state has moved
on to the end of the forward. Every patched block therefore records the state it started from
(:meth:`MergeState.enter`), and a block run again inside the backward pass (:func:`replaying`) runs from that
record and leaves the state as the forward left it: the recomputation is the original computation, so loss and
gradients are those without checkpointing, with any method.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from atc.cluster import check_backend_linkage, validate_linkage
from atc.merge import (LAYOUTS, MERGE_METHODS, Merge, init_token_map, max_removable, merge_by_method,
                       validate_keep_rate)

__all__ = [
    "METRICS",
    "KeepRateSchedule",
    "MergeState",
    "ReductionPlan",
    "BlockStep",
    "plan_reduction",
    "replaying",
    "parse_r",
    "check_options",
    "resolve_proportional_attn",
    "weighted_pool",
    "patched_class",
    "swap_class",
    "patch_blocks",
    "patch_model",
    "remove_patch",
]

#: Which tensor the merge metric is computed from: attention keys / queries / values averaged over heads
#: (keys is the paper's choice), or the block input ``x``.
METRICS = ("keys", "queries", "values", "x")

#: Methods that run *before* a block on its input, as the published K-Medoids/DPC-KNN models place them (they
#: weight tokens by the attention received in the previous block); the others merge inside the block.
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
        rates = [keep_rate] * len(locs) if isinstance(keep_rate, (int, float)) else list(keep_rate)
        if len(rates) != len(locs):
            raise ValueError(
                f"keep_rate has {len(rates)} values but reduction_loc has {len(locs)} locations: give one "
                f"keep rate or one per location"
            )
        rates = [validate_keep_rate(v) for v in rates]
        return KeepRateSchedule(tuple(locs), tuple(rates))

    def kept(self, num_patches: int) -> list[int]:
        """Unprotected token count after each location, e.g. ``[98, 49, 24]`` for N=196, keep 0.5."""
        out, frac = [], 1.0
        for rate in self.keep_rate:
            frac *= rate
            # round away float noise such as 0.7**3 = 0.34299999... before int() truncates, so the counts are
            # the paper's (keep 0.7 at 3 locations: 137, 96, 67 of 196)
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


def check_options(method: str, linkage: str, metric: str, backend: str = "auto") -> None:
    """Fail early (at patch time) on an unknown method, linkage or metric, or an ATC clustering backend named
    explicitly that does not implement the linkage."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {sorted(MERGE_METHODS)}")
    validate_linkage(linkage)
    if method == "atc":
        check_backend_linkage(backend, linkage)
    if metric not in METRICS:
        raise ValueError(f"unknown merge metric {metric!r}: choose one of {METRICS}")


def resolve_proportional_attn(proportional_attn: bool | None, prop_attn: bool | None) -> bool:
    """The one place ToMe's ``prop_attn=`` is mapped to the library's ``proportional_attn`` (default ``True``).

    The public patch functions take both so that ToMe code (``tome.patch.timm(model, prop_attn=True)``) runs
    unchanged; ``None`` means not given. Raises ``TypeError`` when both are given with different values.
    """
    if proportional_attn is not None and prop_attn is not None and bool(proportional_attn) != bool(prop_attn):
        raise TypeError(f"proportional_attn={proportional_attn!r} and prop_attn={prop_attn!r} disagree: prop_attn "
                        f"is ToMe's name for proportional_attn, pass one of them")
    for value in (proportional_attn, prop_attn):
        if value is not None:
            return bool(value)
    return True


class BlockStep(NamedTuple):
    """What one block does in a forward pass, decided from Python ints before the block runs.

    Attributes:
        pre_r: tokens removed from the block input (K-Medoids, DPC-KNN), 0 if none.
        in_r: tokens removed after the attention residual (ATC, ToMe), 0 if none.
        attention_received: K-Medoids: record the attention each token receives here (the next block
            reduces with it as token weights).
        plain: nothing of the patch applies (no reduction, no sizes yet or no proportional attention, no
            attention to record): the original block forward runs unchanged.
    """

    pre_r: int
    in_r: int
    attention_received: bool
    plain: bool


class ReductionPlan(NamedTuple):
    """Token counts of a whole forward pass: static given ``model.r`` and the number of input tokens.

    ``requested[i]`` is what block ``i`` was asked to remove, ``removed[i]`` what it removes (capped at what the
    method can do), ``tokens[i]`` the count after block ``i`` (prefix tokens included).
    """

    r_list: tuple[int, ...]
    requested: tuple[int, ...]
    removed: tuple[int, ...]
    tokens: tuple[int, ...]
    capped: bool
    steps: tuple[BlockStep, ...]


def plan_reduction(r: Any, method: str, depth: int, num_tokens: int, protected: int = 1,
                   proportional_attn: bool = True, masked: bool = False) -> ReductionPlan:
    """Resolve ``model.r`` into the per-block reductions of a forward on ``num_tokens`` tokens (prefix incl.).

    Every count is computed here, from Python ints, so the forward never reads a count from a tensor: shapes
    are static and ``torch.compile`` can trace the whole forward. Requests beyond what ``method`` can remove
    are capped (``capped`` records it); with a :class:`KeepRateSchedule` later locations aim at their planned
    absolute counts from wherever the previous step got to. ``masked``: a padded batch, whose counts are those of
    the padded length (each sample removes as much of that from its real tokens as it would alone, see
    :mod:`atc.merge`); its blocks after a merge always run the patched forward, which masks padding itself.
    """
    parsed = parse_r(r, depth)
    targets: dict[int, int] = {}
    if isinstance(parsed, KeepRateSchedule):
        kept = parsed.kept(num_tokens - protected)
        targets = dict(zip(parsed.reduction_loc, kept))
        r_list = [0] * depth
        current = num_tokens - protected
        for loc, k in zip(parsed.reduction_loc, kept):
            r_list[loc] = max(current - k, 0)
            current = k
    else:
        r_list = parsed
    pre_block = method in PRE_BLOCK_METHODS
    requested, removed, tokens = [], [], []
    t, capped = num_tokens, False
    for i in range(depth):
        want = max(t - protected - targets[i], 0) if i in targets else r_list[i]
        got = min(want, max_removable(method, t, protected, masked))
        capped = capped or got < want
        requested.append(want)
        removed.append(got)
        t -= got
        tokens.append(t)
    steps, merged_before = [], False
    for i, got in enumerate(removed):
        pre_r = got if pre_block else 0
        receive = method == "kmedoids" and i + 1 < depth and removed[i + 1] > 0
        # proportional attention needs log(size) once any block has merged (or this block's input was reduced)
        biased = (proportional_attn or masked) and (merged_before or pre_r > 0)
        steps.append(BlockStep(pre_r, 0 if pre_block else got, receive, not (got or receive or biased)))
        merged_before = merged_before or got > 0
    return ReductionPlan(tuple(r_list), tuple(requested), tuple(removed), tuple(tokens), capped, tuple(steps))


def replaying() -> bool:
    """Whether a block is being run again by gradient checkpointing: its recomputation happens inside the backward
    pass (the autograd engine is running a graph task), a forward never does. Never true while compiling (compiled
    checkpoints recompute inside the compiled graph, not by running the block's Python code again)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


#: The per-forward fields of :class:`MergeState` a block reads: recorded when it starts, restored when it replays.
_BLOCK_INPUTS = ("plan", "size", "valid", "token_map", "attn_received", "rope", "_bias")


def _plan_key(r: Any) -> Any:
    """A hashable snapshot of ``model.r`` (a list may be edited in place between forwards)."""
    return tuple(r) if isinstance(r, list) else r


@dataclass(eq=False)
class MergeState:
    """Options fixed at patch time plus the state of the current forward pass, shared by all patched blocks.

    The first block calls :meth:`start`, which resolves ``r`` into a :class:`ReductionPlan` (cached per
    ``(r, number of tokens)`` in eager mode); each block then looks up its :class:`BlockStep`. During and after
    a forward, ``size (B, T, 1)`` holds the number of original tokens in each current token (``None`` before
    any merge; 0 for padding) and, with ``trace_source``, ``token_map (B, N)`` the current slot of every input
    token (prefix tokens included); for a padded batch ``valid (B, T)`` says which current tokens are real.
    """

    method: str = "atc"
    linkage: str = "average"
    proportional_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"
    metric: str = "keys"
    #: token order after a merge (:data:`atc.merge.LAYOUTS`): each method's published layout, or spatial
    layout: str = "published"
    protected: int = 1
    depth: int = 12
    r: Any = 0
    warned: bool = False
    # per forward
    plan: ReductionPlan | None = None
    size: Tensor | None = None
    token_map: Tensor | None = None
    attn_received: Tensor | None = None
    rope: Tensor | None = None
    valid: Tensor | None = None
    #: the padding mask the model's embedding step found for the next forward (NaFlexViT), read by block 0
    pending_valid: Tensor | None = None
    #: whether the attention mask the blocks receive is the model's own padding mask (NaFlexViT's), which merged
    #: blocks rebuild from ``valid``; any other mask cannot follow merged tokens
    model_mask: bool = False
    _bias: Tensor | None = None
    _plans: dict[Any, ReductionPlan] = field(default_factory=dict, repr=False)
    #: the fields of _BLOCK_INPUTS each block started from in the last forward (for gradient checkpointing)
    _inputs: dict[int, tuple[Any, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown token layout {self.layout!r}: choose one of {LAYOUTS}")

    def set_r(self, r: Any) -> None:
        """Validate ``r`` now (a bad value fails where it is set, naming the problem) and use it from now on."""
        parse_r(r, self.depth)
        self.r = r

    def merges_nothing(self) -> bool:
        """Whether ``r`` removes nothing in any block (the patched model then runs the original forwards, and a
        padding mask need not even be read)."""
        parsed = parse_r(self.r, self.depth)
        return not isinstance(parsed, KeepRateSchedule) and not any(parsed)

    def start(self, x: Tensor, valid: Tensor | None = None) -> ReductionPlan:
        """Begin a forward on the first block's input ``x (B, N, C)``; ``valid (B, N)`` bool: its padding mask
        (prefix tokens included), ``None`` without padding. Returns the plan of this forward."""
        bsz, num_tokens = x.shape[0], x.shape[1]
        self.plan = self._plan_for(num_tokens, valid is not None)
        self.size = None
        self._bias = None
        self.attn_received = None
        self.rope = None
        self.valid = valid
        self.token_map = init_token_map(bsz, num_tokens, x.device) if self.trace_source else None
        return self.plan

    def enter(self, index: int, x: Tensor, valid: Tensor | None = None) -> BlockStep:
        """What block ``index`` calls first in a forward: starts the forward at block 0 (``valid``: see
        :meth:`start`), records what the block starts from (for :meth:`replay`), returns its step."""
        plan = self.start(x, valid) if index == 0 else self.plan
        if not torch.compiler.is_compiling():
            self._inputs[index] = tuple(getattr(self, name) for name in _BLOCK_INPUTS)
        return plan.steps[index]

    @contextlib.contextmanager
    def replay(self, index: int) -> Iterator[BlockStep]:
        """Run block ``index`` again, as gradient checkpointing does in the backward pass: from the state it started
        from in the forward, leaving the state as the forward left it. Yields the block's step."""
        saved = self._inputs.get(index)
        if saved is None:
            raise RuntimeError(f"patched block {index} is recomputed by gradient checkpointing but never ran forward "
                               f"since the model was patched")
        live = tuple(getattr(self, name) for name in _BLOCK_INPUTS)
        for name, value in zip(_BLOCK_INPUTS, saved):
            setattr(self, name, value)
        try:
            yield self.plan.steps[index]
        finally:
            for name, value in zip(_BLOCK_INPUTS, live):
                setattr(self, name, value)

    def _plan_for(self, num_tokens: int, masked: bool = False) -> ReductionPlan:
        args = (self.method, self.depth, num_tokens, self.protected, self.proportional_attn, masked)
        if torch.compiler.is_compiling():
            # traced once per compilation: dynamo guards on r and the token count, and a cache lookup here
            # would add guards on the cache's contents (a recompile every time it grows)
            return plan_reduction(self.r, *args)
        try:
            key = (num_tokens, masked, _plan_key(self.r))
            plan = self._plans.get(key)
        except TypeError:  # an unhashable r (parse_r names the problem)
            return plan_reduction(self.r, *args)
        if plan is None:
            plan = plan_reduction(self.r, *args)
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = plan
            if plan.capped and not self.warned:
                self.warned = True
                self._warn_capped(plan)
        return plan

    def _warn_capped(self, plan: ReductionPlan) -> None:
        """Warn once per model when the method cannot remove what was asked (ToMe's 50% cap). Eager only:
        dynamo cannot trace ``warnings.warn``; ``model._atc_info["capped"]`` says it either way."""
        why = ("bipartite matching removes at most half of the unprotected tokens per block"
               if self.method == "tome" else "at least one unprotected token must remain")
        warnings.warn(
            f"{self.method} cannot remove the requested number of tokens: asked to remove "
            f"{list(plan.requested)} per block, reached token counts {list(plan.tokens)} (incl. {self.protected} "
            f"protected): {why}.",
            stacklevel=2,
        )

    def attention_bias(self, dtype: torch.dtype) -> Tensor | None:
        """``log(size)`` over keys ``(B, 1, 1, T)`` for proportional attention, or ``None``; for a padded batch
        also the padding mask (the dtype's most negative value at padding keys, 0 or ``log(size)`` elsewhere).

        Computed once per merge (sizes only change there), not once per block.
        """
        if self.valid is None and (not self.proportional_attn or self.size is None):
            return None
        if self._bias is None or self._bias.dtype != dtype:
            if self.proportional_attn and self.size is not None:
                bias = self.size.to(dtype).log()[:, None, None, :, 0]
            else:
                bias = torch.zeros(self.valid.shape[0], 1, 1, self.valid.shape[1], dtype=dtype,
                                   device=self.valid.device)
            if self.valid is not None:
                # the most negative finite value, not -inf: a row of padding queries still has finite logits
                bias = bias.masked_fill(~self.valid[:, None, None, :], torch.finfo(dtype).min)
            self._bias = bias
        return self._bias

    def query_weights(self, probs: Tensor) -> Tensor:
        """Attention probabilities ``(B, H, T, T)`` with the rows of padding queries zeroed (K-Medoids' token
        weights sum the attention each token receives from the real tokens only, as in the sample alone)."""
        if self.valid is None:
            return probs
        return probs * self.valid[:, None, :, None].to(probs.dtype)

    def merge(self, x: Tensor, metric: Tensor, r: int, token_weight: Tensor | None = None) -> tuple[Tensor, Merge]:
        """Remove ``r`` tokens from ``x (B, T, C)`` comparing tokens by ``metric (B, T, C')``.

        Sizes and the source map are updated; ``token_weight (B, T, 1)`` multiplies the sizes as merge weights
        (DPC-KNN's learnable weights). Returns the merged ``x (B, T - r, C)`` and the :class:`Merge`.
        """
        options: dict[str, Any] = {"linkage": self.linkage, "backend": self.backend, "layout": self.layout}
        if self.method == "kmedoids" and self.attn_received is not None:
            options["weights"] = self.attn_received
        if self.valid is not None:
            options["valid"] = self.valid
        with torch.no_grad():
            m = merge_by_method(self.method, metric.detach(), r, self.protected, **options)
        size = self.size
        if size is None and self.valid is not None:  # padding has size 0: it weighs nothing anywhere
            size = self.valid.unsqueeze(-1).to(x.dtype)
        x, self.size = m.merge_with_size(x, size, token_weight)
        self.valid = m.valid
        self._bias = None
        self.attn_received = None
        if self.token_map is not None:
            self.token_map = m.merge_token_map(self.token_map)
        return x, m

    def info(self) -> dict[str, Any]:
        """The documented ``model._atc_info`` view of the last forward pass (``{}`` before the first)."""
        plan = self.plan
        if plan is None:
            return {}
        return {
            "tokens": list(plan.tokens),
            "requested_r": list(plan.requested),
            "r": list(plan.r_list),
            "size": self.size,
            "token_map": self.token_map,
            "protected": self.protected,
            "capped": plan.capped,
            "valid": self.valid,
        }


def weighted_pool(x: Tensor, size: Tensor | None, pool_type: str, num_prefix: int, include_prefix: bool,
                  valid: Tensor | None = None) -> Tensor:
    """Global pooling of merged tokens ``(B, T, C) -> (B, C)``: averages are size-weighted.

    ``sum(x * size) / sum(size)`` over the pooled tokens reproduces the mean over the original tokens when
    each merged token is the mean of its members: what MAE's average pooling computes on the unreduced model.
    The final norm is timm's, applied once by the caller (the published MAE code applies it twice with recent
    timm). ``valid (B, T)``: padding mask; padding has size 0 (no weight in averages) and is left out of maxima.
    """
    tokens = x if include_prefix else x[:, num_prefix:]
    if size is None:
        w = tokens.new_ones(tokens.shape[0], tokens.shape[1], 1)
    else:
        w = (size if include_prefix else size[:, num_prefix:]).to(tokens.dtype)
    avg = (tokens * w).sum(dim=1) / w.sum(dim=1)
    if pool_type == "avg":
        return avg
    if valid is not None and pool_type in ("max", "avgmax"):
        real = (valid if include_prefix else valid[:, num_prefix:]).unsqueeze(-1)
        tokens = tokens.masked_fill(~real, torch.finfo(tokens.dtype).min)
    if pool_type == "max":
        return tokens.amax(dim=1)
    if pool_type == "avgmax":
        return 0.5 * (tokens.amax(dim=1) + avg)
    raise ValueError(f"pooling {pool_type!r} is not supported with token merging")


# --------------------------------------------------------------------------------------------------------------
# Swapping classes in place, and undoing it
# --------------------------------------------------------------------------------------------------------------
_PATCHED_CLASSES: dict[tuple[type, tuple[tuple[str, Any], ...]], type] = {}


def patched_class(cls: type, members: dict[str, Any]) -> type:
    """The subclass of ``cls`` overriding ``members``, created once and shared by every module that uses it.

    One class per (original class, members) rather than one per module instance: ``torch.compile`` guards on
    a module's type, so a class per block would compile every block separately (and hit the recompile limit).
    The subclass records the original class as ``_atc_base`` so patched methods can call the original ones.
    """
    key = (cls, tuple(sorted(members.items(), key=lambda kv: kv[0])))
    name = cls.__name__ if cls.__name__.startswith("ATC") else f"ATC{cls.__name__}"
    # a subclass of a patched class (atc.models adds one) keeps pointing at the original
    body = {"_atc_base": getattr(cls, "_atc_base", cls), **members}
    try:
        return _PATCHED_CLASSES[key]
    except KeyError:
        new = _PATCHED_CLASSES[key] = type(name, (cls,), body)
        return new
    except TypeError:  # unhashable member values: an unshared class
        return type(name, (cls,), body)


def swap_class(module: nn.Module, members: dict[str, Any]) -> None:
    """Give ``module`` the shared patched subclass of its class (:func:`patched_class`); :func:`remove_patch`
    restores the original."""
    cls = module.__class__
    module._atc_orig_class = cls
    module.__class__ = patched_class(cls, members)


def _get_r(model: nn.Module) -> Any:
    return model._atc_state.r


def _set_r(model: nn.Module, value: Any) -> None:
    model._atc_state.set_r(value)


def _get_info(model: nn.Module) -> dict[str, Any]:
    return model._atc_state.info()


#: ``model.r`` (validated when set, read by the first block) and ``model._atc_info`` (the last forward's
#: counts, sizes and source map, read from the shared state) on every patched model class
_MODEL_MEMBERS = {
    "r": property(_get_r, _set_r, doc="Tokens to remove per block (int, per-block list, schedule)."),
    "_atc_info": property(_get_info, doc="Token counts, sizes and source map of the last forward pass."),
}


def patch_blocks(blocks: Sequence[nn.Module], state: MergeState, members_for: Callable[[nn.Module], dict[str, Any]],
                 score_dim: int | None = None) -> None:
    """Patch ``blocks`` in place: shared state, block index, DPC-KNN's score layer, the shared patched class.

    ``members_for(block)`` returns the class members overriding the block's (its ``forward``, constants).
    ``score_dim``: input width of DPC-KNN's learnable token score ``Linear(C -> 1)``, initialised to zero
    (uniform weights), added as ``block.atc_token_score`` when the method is ``dpcknn``.
    """
    for i, blk in enumerate(blocks):
        blk._atc_state = state
        blk._atc_index = i
        if state.method == "dpcknn":
            score = nn.Linear(score_dim, 1)
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
            param = next(blk.parameters(), None)
            blk.atc_token_score = score if param is None else score.to(param.device)
        swap_class(blk, members_for(blk))


def patch_model(model: nn.Module, state: MergeState, module_name: str,
                members: dict[str, Any] | None = None) -> nn.Module:
    """Patch the model object itself: ``model.r`` (0: identical to the unpatched model), ``model._atc_info``,
    optional overrides ``members`` (e.g. timm's ``pool``), and the record :func:`atc.patch.remove` uses."""
    model._atc_state = state
    swap_class(model, {**_MODEL_MEMBERS, **(members or {})})
    model._atc_patch_module = module_name
    model.r = 0
    return model


_PATCH_ATTRS = ("_atc_orig_class", "_atc_state", "_atc_index", "_atc_metric", "_atc_info", "_atc_patch_module", "r",
                "atc_token_score")


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
