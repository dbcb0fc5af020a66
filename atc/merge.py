"""From token assignments to merged tokens: one representation for every reduction method.

Every method (ATC, ToMe's bipartite soft matching, K-Medoids, DPC-KNN) returns a :class:`Merge`: for each of
the ``T`` input tokens, the output slot it goes to (``labels (B, T)``, values in ``[0, num_out)``). Protected
prefix tokens (CLS, distillation, register tokens) are the first ``protected_tokens`` tokens; they keep slots
``0..p-1`` and are never merged. The order of the other output slots is each method's published layout by
default (``layout="published"``: ToMe's ``[unmerged sources, destinations]``, K-Medoids' and DPC-KNN's cluster
order) or spatial (``layout="spatial"``: numbered by the smallest input token they hold); ATC's slots are always
spatial. Only ToMe's later merges depend on the layout (its source/destination split is by position).

With a :class:`Merge` you can

- ``merge(x, weight)``: weighted mean per slot ``(B, T, C) -> (B, num_out, C)`` (or the representative tokens
  for selection methods such as K-Medoids),
- ``merge_wavg(x, size)``: ToMe/ATC's size-weighted merge, ``x <- sum(x*size)/sum(size)``, ``size <- sum(size)``
  (``merge_with_size(x, size, weight)`` adds extra merge weights: what the model patchers call),
- ``unmerge(y)``: back to ``(B, T, C)``, each token receiving its slot's vector,
- ``merge_token_map(token_map)``: source tracking, which output slot holds each original token.

:func:`merge_by_method` switches method by name, so a model patcher supports all of them with one call.

Token counts are Python ints given by ``r`` (``Merge.num_out``), never read from a tensor, and the code here
never waits for the device (except ToMe with explicit destination masks, whose index sets are read from the
mask): merging traces under ``torch.compile`` without graph breaks, and ATC's clustering is the custom operator
``atc::agglomerative_clustering`` there (see :mod:`atc.cluster`).

Padded batches: every method takes ``valid (B, T)`` bool (True for real tokens; protected tokens always count as
real). A padding token never merges with a real one, K-Medoids and DPC-KNN never pick one as a centre, and ToMe
never matches one. The rule, the same for every method: the batch removes ``r`` tokens, so it stays rectangular
(``T - r`` outputs), and each sample removes from its real tokens what that method removes from the sample alone
asked for ``r`` (``min(r, what it can remove from its real tokens)``: ``n_b - 1`` of its ``n_b`` unprotected real
tokens for ATC, K-Medoids and DPC-KNN, half of them for ToMe), so a sample's real tokens are merged as if it were
run on its own. The rest of the ``r`` comes from its padding, which merges only with padding (the first padding
tokens share one slot). The output slots keep the method's layout for the real tokens, then the padding slots;
``Merge.valid (B, num_out)`` says which slots are real, for the next block. Since a padded sample keeps at least
one padding slot, a padded batch can remove one token fewer at the extreme (:func:`max_removable` with
``masked=True``). Real and padding tokens of the same sample never share a slot, so a padding slot's merged value
is never NaN either (its weights may be 0: its value is then 0). Without ``valid`` nothing of this runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from atc.cluster import agglomerative_clustering, real_clusters_first

__all__ = [
    "Merge",
    "MERGE_METHODS",
    "merge_by_method",
    "max_removable",
    "validate_keep_rate",
    "atc_merge",
    "tiled_atc_merge",
    "grid_tiles",
    "split_removals",
    "bipartite_soft_matching",
    "kmedoids",
    "dpc_knn",
    "identity_merge",
    "LAYOUTS",
    "proportional_attention_bias",
    "source_matrix",
    "init_token_map",
]


@dataclass
class Merge:
    """A reduction of ``T`` tokens to ``num_out`` tokens.

    Attributes:
        labels: ``(B, T)`` long, output slot of every input token.
        num_out: number of output tokens.
        select: optional ``(B, num_out)`` long, for selection methods (K-Medoids): the input token whose
            vector represents each slot. ``None`` means slots are (weighted) means of their tokens.
        weight_by_size: whether :meth:`merge_with_size` weights tokens by their sizes (ATC, ToMe). DPC-KNN
            averages with its token weights alone, as TCFormer and the published models do (sizes are still
            summed, for proportional attention and pooling).
        eps: added to each slot's total weight in :meth:`merge` (DPC-KNN's ``1e-6``).
        passthrough: the first ``passthrough`` tokens, which are their own slots, are copied unchanged by
            :meth:`merge` (DPC-KNN's protected tokens, as published), not divided by their weights.
        valid: ``(B, num_out)`` bool for a padded batch: which output slots hold real tokens (the others hold only
            padding); ``None`` without padding.

    ``num_out`` is a Python int fixed by the method's ``r``, never read from a tensor, so merging has static
    shapes and needs no host synchronisation (``torch.compile`` traces it without graph breaks).
    """

    labels: Tensor
    num_out: int
    select: Tensor | None = None
    weight_by_size: bool = True
    eps: float = 0.0
    passthrough: int = 0
    valid: Tensor | None = None

    def _divide(self, num: Tensor, den: Tensor) -> Tensor:
        """``num / den`` per slot; a padding slot's total weight may be 0 (padding has size 0): it divides by 1."""
        if self.valid is not None:
            den = den.masked_fill(~self.valid.unsqueeze(-1), 1.0)
        return num / den

    def _scatter_sum(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, num_out, C)``: sum of each slot's tokens."""
        bsz, t, c = x.shape
        # one flat index over the batch, so a single index_add covers every sample
        offsets = torch.arange(0, bsz * self.num_out, self.num_out, device=x.device)
        flat = (self.labels + offsets.unsqueeze(1)).reshape(-1)
        out = x.new_zeros(bsz * self.num_out, c)
        out.index_add_(0, flat, x.reshape(bsz * t, c))
        return out.view(bsz, self.num_out, c)

    def merge(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """``(B, T, C) -> (B, num_out, C)``: mean of each slot's tokens weighted by ``weight (B, T, 1)``
        (``sum(x * w) / (sum(w) + eps)``)."""
        if self.select is not None:
            return x.gather(1, self.select.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        c = x.shape[-1]
        if weight is None:
            ones = x.new_ones(x.shape[0], x.shape[1], 1)
            sums = self._scatter_sum(torch.cat([x, ones], dim=-1))
        else:
            weight = weight.to(x.dtype)
            # numerator and denominator in one scatter: [x * w, w] summed per slot
            sums = self._scatter_sum(torch.cat([x * weight, weight], dim=-1))
        out = self._divide(sums[..., :c], sums[..., c:] + self.eps if self.eps else sums[..., c:])
        if self.passthrough:
            out = torch.cat([x[:, : self.passthrough], out[:, self.passthrough:]], dim=1)
        return out

    def merge_size(self, size: Tensor) -> Tensor:
        """``(B, T, 1) -> (B, num_out, 1)``: sizes add up."""
        return self._scatter_sum(size)

    def merge_with_size(
        self, x: Tensor, size: Tensor | None = None, weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Merge tokens and their sizes together: what a patched block does at every reduction.

        Args:
            x: ``(B, T, C)`` tokens.
            size: ``(B, T, 1)`` number of original tokens in each token; ``None``: all 1.
            weight: optional ``(B, T, 1)`` extra merge weights (DPC-KNN's learnable weights); tokens are
                averaged with weights ``size * weight``.

        Returns:
            ``(x_merged (B, num_out, C), size_merged (B, num_out, 1))``, ``size_merged`` the summed sizes: the
            values of ``merge(x, size * weight)`` and ``merge_size(size)``, computed with one scatter.
        """
        c = x.shape[-1]
        if not self.weight_by_size:
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)
            return self.merge(x, weight), self.merge_size(size)
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
            if weight is None and self.select is None and not self.eps:  # unit sizes: plain means and member counts
                sums = self._scatter_sum(torch.cat([x, size], dim=-1))
                return self._divide(sums[..., :c], sums[..., c:]), sums[..., c:]
        if self.select is not None or size.dtype != x.dtype or self.eps:
            w = size if weight is None else size * weight
            return self.merge(x, w), self.merge_size(size)
        if weight is None:
            sums = self._scatter_sum(torch.cat([x * size, size], dim=-1))
            return self._divide(sums[..., :c], sums[..., c:]), sums[..., c:]
        w = (size * weight).to(x.dtype)
        sums = self._scatter_sum(torch.cat([x * w, w, size], dim=-1))
        return self._divide(sums[..., :c], sums[..., c:c + 1]), sums[..., c + 1:]

    def merge_wavg(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Size-weighted merge: returns ``(x_merged (B, num_out, C), size_merged (B, num_out, 1))``."""
        return self.merge_with_size(x, size)

    def unmerge(self, y: Tensor) -> Tensor:
        """``(B, num_out, C) -> (B, T, C)``: every input token receives its slot's vector."""
        return y.gather(1, self.labels.unsqueeze(-1).expand(-1, -1, y.shape[-1]))

    def merge_token_map(self, token_map: Tensor) -> Tensor:
        """Source tracking: ``token_map (B, N)`` maps each of the N original tokens to its current slot."""
        return self.labels.gather(1, token_map)

    def then(self, other: "Merge") -> "Merge":
        """The composition ``other ∘ self`` as one merge from this merge's inputs to ``other``'s outputs."""
        if self.select is not None or other.select is not None:
            raise ValueError("selection merges (K-Medoids) cannot be composed")
        return Merge(other.labels.gather(1, self.labels), other.num_out, valid=other.valid)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def init_token_map(batch_size: int, num_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """Identity source map ``(B, N)``: original token ``n`` sits in slot ``n``."""
    return torch.arange(num_tokens, device=device).repeat(batch_size, 1)


def source_matrix(token_map: Tensor, num_out: int) -> Tensor:
    """ToMe-style dense source ``(B, num_out, N)``: ``[b, k, n] = 1`` if original token ``n`` is in slot ``k``."""
    return F.one_hot(token_map, num_out).transpose(1, 2).to(torch.float32)


def proportional_attention_bias(size: Tensor) -> Tensor:
    """Additive attention bias ``log(size)`` over the key axis: ``(B, T, 1) -> (B, 1, 1, T)``."""
    return size.log().squeeze(-1)[:, None, None, :]


def _with_prefix(cluster_labels: Tensor, protected_tokens: int) -> Tensor:
    """Prepend protected tokens with their own slots ``0..p-1`` and shift the others' labels by ``p``."""
    if protected_tokens == 0:
        return cluster_labels
    bsz = cluster_labels.shape[0]
    prefix = torch.arange(protected_tokens, device=cluster_labels.device).expand(bsz, protected_tokens)
    return torch.cat([prefix, cluster_labels + protected_tokens], dim=1)


def _relabel_by_first_token(labels: Tensor, num_labels: int) -> Tensor:
    """Renumber labels ``(B, T)`` with values in ``[0, num_labels)`` in order of each cluster's first token.

    The result equals :func:`atc.cluster.canonical_labels`; the caller passes the bound ``num_labels`` (a Python
    int) instead of reading ``labels.max()``, so nothing waits for the device and the shapes are static.
    """
    bsz, t = labels.shape
    pos = torch.arange(t, device=labels.device)
    # unused labels keep first = t and sort after every used one (stable sort keeps them out of the ranks < K)
    first = torch.full((bsz, num_labels), t, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(1, labels, pos.expand(bsz, t), reduce="amin")
    order = first.argsort(dim=1, stable=True)
    ranks = pos if num_labels == t else torch.arange(num_labels, device=labels.device)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, ranks.expand(bsz, num_labels))
    return rank.gather(1, labels)


def _check_valid(valid: Tensor | None, metric: Tensor, protected_tokens: int) -> Tensor | None:
    """``valid (B, T)`` bool on ``metric``'s device with the protected tokens counted as real, or ``None``."""
    if valid is None:
        return None
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != tuple(metric.shape[:2]):
        what = f"{valid.dtype} tensor of shape {tuple(valid.shape)}" if isinstance(valid, Tensor) else type(valid)
        raise ValueError(f"valid must be a bool tensor of the metric's (B, T) = {tuple(metric.shape[:2])} shape, "
                         f"True for real tokens; got {what}")
    valid = valid.to(metric.device)
    if protected_tokens:
        valid = valid.clone()
        valid[:, :protected_tokens] = True
    return valid


def _slot_valid(labels: Tensor, valid: Tensor, num_out: int) -> Tensor:
    """``(B, num_out)``: whether each output slot holds a real token (slots never mix real and padding)."""
    holds = torch.zeros(labels.shape[0], num_out, dtype=torch.long, device=labels.device)
    return holds.scatter_reduce_(1, labels, valid.long(), reduce="amax").bool()


def _padding_slots(pad: Tensor, first_slot: Tensor, surplus: Tensor) -> Tensor:
    """Slots of padding tokens ``pad (B, n)`` (bool) after a sample's ``first_slot (B,)`` real slots: one each in
    token order, the first ``surplus (B,) + 1`` sharing the first (the part of ``r`` the real tokens could not give).
    Values at real tokens are meaningless."""
    rank = pad.long().cumsum(1) - 1
    return first_slot.unsqueeze(1) + (rank - surplus.unsqueeze(1)).clamp_min(0)


def _active_own_cluster(assign: Tensor, centres: Tensor, active: Tensor) -> Tensor:
    """:func:`_own_cluster` for the ``active (B, K)`` centres only (the others write into a dropped column)."""
    bsz, n = assign.shape
    k = centres.shape[1]
    target = torch.where(active, centres, n)
    out = torch.cat([assign, assign.new_zeros(bsz, 1)], dim=1)
    return out.scatter(1, target, torch.arange(k, device=assign.device).expand(bsz, k))[:, :n]


def _check_r(r: int, num_tokens: int, protected_tokens: int, limit: int, method: str) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r (tokens to remove) must be an int, got {type(r).__name__} {r!r}")
    if not 0 <= protected_tokens <= num_tokens:
        raise ValueError(f"protected_tokens must be in [0, {num_tokens}], got {protected_tokens}")
    if r < 0 or r > limit:
        raise ValueError(
            f"{method} can remove between 0 and {limit} of {num_tokens} tokens "
            f"({protected_tokens} protected), got r={r}"
        )
    return r


def identity_merge(batch_size: int, num_tokens: int, device: torch.device | str | None = None,
                   valid: Tensor | None = None) -> Merge:
    """The merge that keeps every token in its place (``valid``: the padding mask, carried as it is)."""
    return Merge(init_token_map(batch_size, num_tokens, device), num_tokens, valid=valid)


def _normalize(metric: Tensor) -> Tensor:
    return F.normalize(metric, dim=-1, eps=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Methods: (metric (B, T, C), r, protected_tokens, **options) -> Merge
# --------------------------------------------------------------------------------------------------------------
def atc_merge(
    metric: Tensor, r: int, protected_tokens: int = 1, *, linkage: str = "average", backend: str = "auto",
    valid: Tensor | None = None, **_: object
) -> Merge:
    """ATC: agglomerative clustering of the unprotected tokens into ``T - p - r`` clusters (cosine distance).

    ``valid (B, T)``: padding mask (module docstring); the clustering's own padding rule
    (:func:`atc.cluster.agglomerative_clustering`) is this module's: real clusters first, then padding."""
    bsz, t, _c = metric.shape
    p = protected_tokens
    valid = _check_valid(valid, metric, p)
    r = _check_r(r, t, p, max_removable("atc", t, p, masked=valid is not None), "ATC")
    if r == 0:
        return identity_merge(bsz, t, metric.device, valid)
    if valid is None:
        labels = agglomerative_clustering(metric[:, p:], t - p - r, linkage, backend)
        return Merge(_with_prefix(labels, p), t - r)
    labels = _with_prefix(agglomerative_clustering(metric[:, p:], t - p - r, linkage, backend, valid=valid[:, p:]), p)
    return Merge(labels, t - r, valid=_slot_valid(labels, valid, t - r))


def grid_tiles(h: int, w: int, tile_h: int, tile_w: int) -> list[list[int]]:
    """The tiles of an ``h × w`` token grid (raster order) cut into ``tile_h × tile_w`` rectangles from the
    top-left corner (the last row and column of tiles may be smaller): per tile, its token indices in raster
    order; tiles in raster order."""
    if min(h, w, tile_h, tile_w) < 1:
        raise ValueError(f"grid {h}x{w} and tile {tile_h}x{tile_w} must be positive")
    return [[row * w + col for row in range(r0, min(r0 + tile_h, h)) for col in range(c0, min(c0 + tile_w, w))]
            for r0 in range(0, h, tile_h) for c0 in range(0, w, tile_w)]


def split_removals(sizes: Sequence[int], r: int) -> list[int]:
    """Split ``r`` removals over parts of the given sizes in proportion to their size (largest remainder; equal
    remainders go to the earlier part), each part keeping at least one token; the result sums to ``r``."""
    total = sum(sizes)
    if not 0 <= r <= total - len(sizes):
        raise ValueError(f"cannot remove {r} of {total} tokens split into {len(sizes)} parts that each keep one")
    shares = [r * n / total for n in sizes]
    out = [min(int(share), n - 1) for share, n in zip(shares, sizes)]
    # hand out what rounding down left, largest remainder first, to parts that can still give a token
    for i in sorted(range(len(sizes)), key=lambda i: (-(shares[i] - int(shares[i])), i)):
        if sum(out) == r:
            break
        if out[i] < sizes[i] - 1:
            out[i] += 1
    i = 0
    while sum(out) < r:  # parts capped at one token left their share to the others
        if out[i] < sizes[i] - 1:
            out[i] += 1
        i = (i + 1) % len(sizes)
    return out


@functools.lru_cache(maxsize=64)
def _tile_groups(h: int, w: int, tile_h: int, tile_w: int, r: int,
                 device: torch.device) -> tuple[tuple[int, int, Tensor, Tensor], ...]:
    """The layout :func:`tiled_atc_merge` clusters by, per group of tiles with equal size and removals: ``(size,
    removals, token indices (G*size,), first output slot of each tile (G,))``, the index tensors on ``device``.
    The same for every block and step on one grid, so it is built (and copied to the device) once."""
    n = h * w
    tiles = grid_tiles(h, w, tile_h, tile_w)
    if r > n - len(tiles):
        raise ValueError(f"tiled ATC keeps one token per tile, so it can remove at most {n - len(tiles)} of {n} "
                         f"tokens with {len(tiles)} tiles of {tile_h}x{tile_w}; got r={r} (use larger tiles)")
    removals = split_removals([len(t) for t in tiles], r)
    base, offset = [], 0
    for t, rt in zip(tiles, removals):
        base.append(offset)
        offset += len(t) - rt
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (t, rt) in enumerate(zip(tiles, removals)):
        groups.setdefault((len(t), rt), []).append(i)
    with torch.inference_mode(False):  # cached tensors must also serve calls outside inference mode
        return tuple(
            (size, rt, torch.tensor([j for i in members for j in tiles[i]], dtype=torch.long, device=device),
             torch.tensor([base[i] for i in members], dtype=torch.long, device=device))
            for (size, rt), members in groups.items()
        )


def tiled_atc_merge(
    metric: Tensor, r: int, grid: tuple[int, int], tile: tuple[int, int], *, linkage: str = "average",
    backend: str = "auto",
) -> Merge:
    """ATC within tiles: the ``h × w`` token grid of ``metric (B, h*w, C)`` is cut into ``tile`` rectangles
    (:func:`grid_tiles`), ``r`` is split over the tiles in proportion to their size (:func:`split_removals`), and
    each tile is clustered on its own, exactly as :func:`atc_merge` would cluster it alone. Tiles of equal size and
    removals, of every sample, go to :func:`atc.cluster.agglomerative_clustering` together in one batched call
    (``B × tiles`` small problems instead of ``B`` large ones: one call when the tile divides the grid; at most
    eight otherwise, for the edge tiles). Slots are numbered by their smallest token (spatial order), so no
    cluster spans two tiles and the result has ``h*w - r`` slots. No protected tokens."""
    bsz, n, c = metric.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"a {h}x{w} token grid holds {h * w} tokens, but the metric has {n}")
    r = _check_r(r, n, 0, max(n - 1, 0), "ATC")
    if r == 0:
        return identity_merge(bsz, n, metric.device)
    labels = torch.empty(bsz, n, dtype=torch.long, device=metric.device)
    # torch.compile traces the uncached function (its tensors become graph constants) without warning about the cache
    layout = _tile_groups.__wrapped__ if torch.compiler.is_compiling() else _tile_groups
    for size, rt, idx, offsets in layout(h, w, tile[0], tile[1], r, metric.device):
        members = offsets.shape[0]
        parts = metric[:, idx].reshape(bsz * members, size, c)
        local = agglomerative_clustering(parts, size - rt, linkage, backend) if rt else \
            torch.arange(size, device=metric.device).expand(bsz * members, size)
        labels[:, idx] = (local.reshape(bsz, members, size) + offsets[:, None]).reshape(bsz, -1)
    return Merge(_relabel_by_first_token(labels, n - r), n - r)


#: Token layouts after a merge: ``"published"`` (each method's published output order) or ``"spatial"``
#: (slots numbered by the smallest input token they hold). Only ToMe's later merges depend on it (its A/B split
#: is by position); ATC is order-independent and always spatial.
LAYOUTS = ("published", "spatial")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown token layout {layout!r}: choose one of {LAYOUTS}")


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    protected_tokens: int = 1,
    *,
    dst_mask: Tensor | None = None,
    dst_index: Sequence[int] | None = None,
    layout: str = "published",
    sort_unmerged: bool | None = None,
    valid: Tensor | None = None,
    **_: object,
) -> Merge:
    """ToMe's bipartite soft matching (Bolya et al. 2023).

    Tokens at odd positions form the destination set B, those at even positions the source set A (as in
    ToMe, where the CLS token at position 0 is in A). Protected tokens are never merged. The ``r`` source tokens
    whose best cosine match is highest (stable order on ties) merge into that destination.

    ``layout="published"`` (default) lays the output out as ToMe does: ``[protected tokens, the unmerged A
    tokens, every B token in index order]``, the unmerged A tokens in index order when ``sort_unmerged`` (default:
    when there are protected tokens, i.e. a class token), otherwise in descending order of their best-match
    score (ToMe without a class token: average-pooled ViTs, the detection backbone). The next merge splits A/B
    by position in this order, so the layout decides which pairs merge later. ``layout="spatial"`` numbers the
    slots by their smallest input token instead (spatial order kept).

    ``dst_mask (T,)`` bool overrides the split (the Stable Diffusion variant picks one destination per sx×sy
    cell; its output is unmerged inside the same block, so it always uses the spatial layout). ``dst_index``
    gives the same destinations as Python ints: the index sets are then known without reading a tensor back
    from the device, so this path traces under ``torch.compile`` without a graph break.

    ``valid (B, T)``: padding mask (module docstring). The split stays by position in the padded sequence (with
    padding at the end, as NaFlexViT and ``transformers`` pad, a sample's real tokens split as when it is alone);
    a source matches real destinations only, each sample merges its best ``min(r, real sources, real
    destinations)`` real sources, and its padding slots come after its layout of real tokens.
    """
    _check_layout(layout)
    bsz, t, _c = metric.shape
    p = protected_tokens
    pos = torch.arange(t, device=metric.device)
    if dst_mask is not None and dst_index is not None:
        raise ValueError("give the destinations either as dst_mask or as dst_index, not both")
    valid = _check_valid(valid, metric, p)
    if valid is not None:
        if dst_mask is not None or dst_index is not None:
            raise ValueError("bipartite soft matching takes destinations (dst_mask / dst_index, ToMe-SD) or a padding "
                             "mask (valid), not both")
        return _tome_padded(metric, r, p, valid, layout, p > 0 if sort_unmerged is None else sort_unmerged)
    if dst_mask is not None or dst_index is not None:
        # explicit destinations (ToMe-SD): every source token may merge
        labels = pos.repeat(bsz, 1)
        if dst_index is not None:
            dst_set = {int(i) for i in dst_index if p <= int(i) < t}
            dst_list, src_list = sorted(dst_set), [i for i in range(p, t) if i not in dst_set]
            dst_idx = torch.tensor(dst_list, dtype=torch.long, device=metric.device)
            src_idx = torch.tensor(src_list, dtype=torch.long, device=metric.device)
            num_src, num_dst = len(src_list), len(dst_list)
        else:
            # the index sets depend on the mask's values, so this path reads them on the host
            dst_mask = dst_mask.to(metric.device) & (pos >= p)
            src_mask = ~dst_mask & (pos >= p)
            src_idx, dst_idx = src_mask.nonzero().squeeze(1), dst_mask.nonzero().squeeze(1)
            num_src, num_dst = len(src_idx), len(dst_idx)
        r = _check_r(r, t, p, num_src if num_dst else 0, "bipartite soft matching")
        if r == 0:
            return identity_merge(bsz, t, metric.device)
        m = _normalize(metric)
        order, node_idx = _best_matches(m[:, src_idx] @ m[:, dst_idx].transpose(1, 2))
        src = order[:, :r]
        labels.scatter_(1, src_idx[src], dst_idx[node_idx.gather(1, src)])
        return Merge(_relabel_by_first_token(labels, t), t - r)

    # ToMe's alternating split as strided views of the tokens: static shapes, no index tensors, and it can
    # halve the free tokens at most
    src_start, dst_start = p + p % 2, p + 1 - p % 2
    num_src, num_dst = len(range(src_start, t, 2)), len(range(dst_start, t, 2))
    r = _check_r(r, t, p, min(num_src, num_dst), "bipartite soft matching")
    if r == 0:
        return identity_merge(bsz, t, metric.device)
    m = _normalize(metric)
    order, node_idx = _best_matches(m[:, src_start::2] @ m[:, dst_start::2].transpose(1, 2))
    src, unm = order[:, :r], order[:, r:]
    if layout == "spatial":
        labels = pos.repeat(bsz, 1)
        labels[:, src_start::2].scatter_(1, src, pos[dst_start::2][node_idx.gather(1, src)])
        return Merge(_relabel_by_first_token(labels, t), t - r)
    if sort_unmerged is None:
        sort_unmerged = p > 0
    if sort_unmerged:
        unm = unm.sort(dim=1).values
    num_unm = num_src - r
    # slots: [protected 0..p-1 | unmerged A p..p+num_unm-1 | B in index order]
    src_slots = torch.empty_like(order)
    src_slots.scatter_(1, unm, torch.arange(p, p + num_unm, device=metric.device).expand(bsz, num_unm))
    src_slots.scatter_(1, src, p + num_unm + node_idx.gather(1, src))
    labels = torch.empty(bsz, t, dtype=torch.long, device=metric.device)
    labels[:, :p] = pos[:p]
    labels[:, src_start::2] = src_slots
    labels[:, dst_start::2] = torch.arange(p + num_unm, t - r, device=metric.device)
    return Merge(labels, t - r)


def _tome_padded(metric: Tensor, r: int, p: int, valid: Tensor, layout: str, sort_unmerged: bool) -> Merge:
    """Bipartite soft matching of a padded batch (see :func:`bipartite_soft_matching`); static shapes: each
    sample's own count of merges is a mask over the ranked sources, not a slice."""
    bsz, t, _c = metric.shape
    dev = metric.device
    pos = torch.arange(t, device=dev)
    src_start, dst_start = p + p % 2, p + 1 - p % 2
    num_src = len(range(src_start, t, 2))
    r = _check_r(r, t, p, max_removable("tome", t, p, masked=True), "bipartite soft matching")
    if r == 0:
        return identity_merge(bsz, t, dev, valid)
    real_src, real_dst = valid[:, src_start::2], valid[:, dst_start::2]
    m = _normalize(metric.masked_fill(~valid.unsqueeze(-1), 0.0))
    scores = (m[:, src_start::2] @ m[:, dst_start::2].transpose(1, 2)).masked_fill(~real_dst.unsqueeze(1), -torch.inf)
    node_max, node_idx = scores.max(dim=-1)
    # padding sources rank last; real ones rank by their best real match, as in the sample alone
    order = node_max.masked_fill(~real_src, -torch.inf).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_src, device=dev).expand(bsz, num_src))
    n_src, n_dst = real_src.sum(1), real_dst.sum(1)
    merges = torch.minimum(torch.minimum(n_src, n_dst), torch.full_like(n_src, r))  # what the sample alone does
    merged = rank < merges.unsqueeze(1)  # the top sources are real: real scores beat -inf
    pad = ~valid
    surplus = r - merges
    if layout == "spatial":
        labels = pos.repeat(bsz, 1)
        dst_pos = pos[dst_start::2][node_idx]
        labels[:, src_start::2] = torch.where(merged, dst_pos, labels[:, src_start::2])
        first_pad = torch.where(pad, pos, t).amin(dim=1, keepdim=True).clamp_max(t - 1)
        folded = pad & (pad.long().cumsum(1) - 1 <= surplus.unsqueeze(1))
        labels = _relabel_by_first_token(torch.where(folded, first_pad, labels), t)
        labels = real_clusters_first(labels, valid, t - r)
        return Merge(labels, t - r, valid=_slot_valid(labels, valid, t - r))
    unmerged = real_src & ~merged
    if sort_unmerged:
        unm_pos = unmerged.long().cumsum(1) - 1
    else:  # by rank: the position of each unmerged source among the unmerged ones in ranked order
        in_order = unmerged.gather(1, order).long()
        unm_pos = torch.empty_like(order).scatter_(1, order, in_order.cumsum(1) - 1)
    num_unm = unmerged.sum(1, keepdim=True)
    dst_slots = p + num_unm + real_dst.long().cumsum(1) - 1
    pad_slots = _padding_slots(pad, p + num_unm.squeeze(1) + n_dst, surplus)
    src_slots = torch.where(merged, dst_slots.gather(1, node_idx), p + unm_pos)
    labels = torch.empty(bsz, t, dtype=torch.long, device=dev)
    labels[:, :p] = pos[:p]
    labels[:, src_start::2] = torch.where(real_src, src_slots, pad_slots[:, src_start::2])
    labels[:, dst_start::2] = torch.where(real_dst, dst_slots, pad_slots[:, dst_start::2])
    return Merge(labels, t - r, valid=_slot_valid(labels, valid, t - r))


def _best_matches(scores: Tensor) -> tuple[Tensor, Tensor]:
    """From source-destination similarities ``(B, S, D)``: ``(order, node_idx)``, both ``(B, S)``.

    ``order`` ranks the sources by their best match, highest first (equal scores keep source order: a stable
    sort); ``node_idx`` is each source's best destination. The first ``r`` of ``order`` merge.
    """
    node_max, node_idx = scores.max(dim=-1)
    return node_max.argsort(dim=-1, descending=True, stable=True), node_idx


def _own_cluster(assign: Tensor, centres: Tensor) -> Tensor:
    """Put every centre ``centres (B, K)`` (token indices) into its own cluster ``0..K-1`` of ``assign (B, n)``."""
    k = centres.shape[1]
    return assign.scatter(1, centres, torch.arange(k, device=assign.device).expand(centres.shape[0], k))


def kmedoids(
    metric: Tensor,
    r: int,
    protected_tokens: int = 1,
    *,
    weights: Tensor | None = None,
    iters: int = 3,
    layout: str = "published",
    valid: Tensor | None = None,
    **_: object,
) -> Merge:
    """K-Medoids on the unprotected tokens, as the published K-Medoids models: ``K = T - p - r`` medoids, output
    = the medoid tokens.

    ``weights (B, T)``: importance of each token (the attention it received in the previous block, summed over
    heads and queries); the initial medoids are the top-K by weight, in that order. Without weights every token
    weighs 1 and the initial medoids are chosen farthest-point style from token 0 (the published code starts
    from a random token): each next medoid is the token whose largest distance to the medoids so far is the
    largest. ``iters`` rounds of assignment (nearest medoid, euclidean ``cdist``, first on ties) and update: the
    new medoid of cluster ``k`` is the member ``i`` minimising ``w_i * sum_j d(i, j)`` over *all* tokens ``j``
    (token 0 for an empty cluster), as published.

    ``layout="published"``: slot ``p + k`` holds medoid ``k`` (the order of the initial top-K); ``"spatial"``:
    slots numbered by their smallest token. Labels assign every token to its nearest medoid (each medoid in its
    own slot); the merged value of a slot is its medoid token (``Merge.select``).

    ``valid (B, T)``: padding mask (module docstring): each sample runs the above on its real tokens with its own
    number of medoids; padding is never a medoid (a padding slot's value is one of its padding tokens).
    """
    _check_layout(layout)
    bsz, t, _c = metric.shape
    p = protected_tokens
    valid = _check_valid(valid, metric, p)
    if valid is not None:
        return _kmedoids_padded(metric, r, p, valid, weights, iters, layout)
    r = _check_r(r, t, p, max(t - p - 1, 0), "K-Medoids")
    if r == 0:
        return identity_merge(bsz, t, metric.device)
    x = metric[:, p:].float()
    n = x.shape[1]
    k = n - r
    dist = torch.cdist(x, x)
    if weights is None:
        w = x.new_ones(bsz, n)
        medoids = torch.zeros(bsz, 1, dtype=torch.long, device=x.device)
        chosen = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
        for _ in range(1, k):
            chosen = chosen.scatter(1, medoids[:, -1:], True)
            far = dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).masked_fill(chosen.unsqueeze(-1), 0.0)
            medoids = torch.cat([medoids, far.amax(dim=-1).argmax(dim=-1, keepdim=True)], dim=1)
    else:
        w = weights[:, p:].float()
        medoids = w.topk(k, dim=1).indices
    # published update cost: each row of the distance matrix scaled by its token's weight, summed over all
    # tokens; rows outside the cluster count as 1e6 per entry
    cost = (dist * w.unsqueeze(-1)).sum(dim=-1)
    outside = torch.full((), 1e6 * n, dtype=cost.dtype, device=x.device)
    clusters = torch.arange(k, device=x.device)[None, :, None]
    for _ in range(iters):
        assign = dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).argmin(dim=-1)
        member = assign.unsqueeze(1) == clusters  # (B, K, n)
        medoids = torch.where(member, cost.unsqueeze(1), outside).argmin(dim=-1)
    assign = _own_cluster(dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).argmin(dim=-1), medoids)
    if layout == "spatial":
        labels = _relabel_by_first_token(assign, k)
        select = torch.empty_like(medoids)
        select.scatter_(1, labels.gather(1, medoids), medoids)
    else:
        labels, select = assign, medoids
    prefix = torch.arange(p, device=x.device).expand(bsz, p)
    return Merge(_with_prefix(labels, p), t - r, torch.cat([prefix, select + p], 1))


def _padded_counts(valid: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """For the unprotected part of a padded batch ``valid (B, n)``: each sample's real tokens ``n_b``, the clusters
    it keeps ``k_b = n_b - min(r, n_b - 1)`` (as alone; 0 without real tokens), and the ``surplus`` of ``r`` its
    padding gives up."""
    n_real = valid.sum(1)
    kept = n_real - torch.minimum(torch.full_like(n_real, r), (n_real - 1).clamp_min(0))
    return n_real, kept, r - (n_real - kept)


def _finish_padded(assign: Tensor, centres: Tensor, kept: Tensor, surplus: Tensor, v: Tensor, p: int, t: int,
                   r: int, layout: str) -> tuple[Tensor, Tensor]:
    """Labels ``(B, T)`` (prefix included) and the centre token of every slot ``(B, T - r)`` of a padded
    K-Medoids/DPC-KNN run: ``assign (B, n)`` the real tokens' centre slots, ``centres (B, K)`` token indices of
    which the first ``kept (B,)`` are real; padding slots follow, holding the first token of each."""
    bsz, n = assign.shape
    k = n - r
    slots = torch.arange(k, device=assign.device).expand(bsz, k)
    active = slots < kept.unsqueeze(1)
    labels = torch.where(v, _active_own_cluster(assign, centres, active), _padding_slots(~v, kept, surplus))
    if layout == "spatial":
        labels = real_clusters_first(_relabel_by_first_token(labels, k), v, k)
    # each slot's representative token: its centre, or for a padding slot its first token
    first = torch.full((bsz, k + 1), n, dtype=torch.long, device=assign.device)
    first.scatter_reduce_(1, labels, torch.arange(n, device=assign.device).expand(bsz, n), reduce="amin")
    centre_slot = torch.where(active, labels.gather(1, centres), k)  # inactive centres go to a dropped column
    select = first.scatter(1, centre_slot, centres)[:, :k]
    prefix = torch.arange(p, device=assign.device).expand(bsz, p)
    return _with_prefix(labels, p), torch.cat([prefix, select + p], dim=1)


def _kmedoids_padded(metric: Tensor, r: int, p: int, valid: Tensor, weights: Tensor | None, iters: int,
                     layout: str) -> Merge:
    """:func:`kmedoids` on a padded batch: the published steps per sample on its real tokens, vectorised with
    each sample's own number of medoids (the slots past it are inactive)."""
    bsz, t, _c = metric.shape
    r = _check_r(r, t, p, max_removable("kmedoids", t, p, masked=True), "K-Medoids")
    if r == 0:
        return identity_merge(bsz, t, metric.device, valid)
    v = valid[:, p:]
    x = metric[:, p:].float().masked_fill(~v.unsqueeze(-1), 0.0)
    n = x.shape[1]
    k = n - r
    n_real, kept, surplus = _padded_counts(v, r)
    active = torch.arange(k, device=x.device).expand(bsz, k) < kept.unsqueeze(1)
    dist = torch.cdist(x, x)
    if weights is None:
        w = x.new_ones(bsz, n)
        medoids = v.long().argmax(dim=1, keepdim=True)  # the first real token
        chosen = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
        for _ in range(1, k):
            chosen = chosen.scatter(1, medoids[:, -1:], True)
            far = dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).masked_fill(chosen.unsqueeze(-1), 0.0)
            far = far.amax(dim=-1).masked_fill(~v, -1.0)  # padding is never a medoid
            medoids = torch.cat([medoids, far.argmax(dim=-1, keepdim=True)], dim=1)
    else:
        w = weights[:, p:].float()
        medoids = w.masked_fill(~v, -torch.inf).topk(k, dim=1).indices
    # the published cost over the sample's real tokens; an empty cluster takes the first real token
    cost = (dist * w.unsqueeze(-1)).masked_fill(~v.unsqueeze(1), 0.0).sum(dim=-1)
    outside = (1e6 * n_real).to(cost.dtype)[:, None, None]
    fallback = torch.where(v.unsqueeze(1), outside, torch.inf)
    clusters = torch.arange(k, device=x.device)[None, :, None]
    inactive = ~active.unsqueeze(1)
    for _ in range(iters):
        assign = dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).masked_fill(inactive, torch.inf).argmin(-1)
        member = (assign.unsqueeze(1) == clusters) & v.unsqueeze(1)
        medoids = torch.where(member, cost.unsqueeze(1), fallback).argmin(dim=-1)
    assign = dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).masked_fill(inactive, torch.inf).argmin(-1)
    labels, select = _finish_padded(assign, medoids, kept, surplus, v, p, t, r, layout)
    return Merge(labels, t - r, select, valid=_slot_valid(labels, valid, t - r))


def _dpc_knn_padded(metric: Tensor, r: int, p: int, valid: Tensor, k: int, layout: str) -> Merge:
    """:func:`dpc_knn` on a padded batch: each sample's real tokens as alone, vectorised with its own number of
    centres."""
    bsz, t, c = metric.shape
    r = _check_r(r, t, p, max_removable("dpcknn", t, p, masked=True), "DPC-KNN")
    if r == 0:
        return identity_merge(bsz, t, metric.device, valid)
    v = valid[:, p:]
    x = metric[:, p:].float().masked_fill(~v.unsqueeze(-1), 0.0)
    n = x.shape[1]
    num_clusters = n - r
    n_real, kept, surplus = _padded_counts(v, r)
    real_pair = v.unsqueeze(2) & v.unsqueeze(1)
    dist = torch.cdist(x, x) / (c**0.5)
    knn = dist.masked_fill(~real_pair, torch.inf).topk(min(k, n), dim=-1, largest=False).values
    k_real = torch.clamp(n_real, max=k).clamp_min(1)  # the sample alone has min(k, n_b) neighbours
    near = torch.arange(knn.shape[-1], device=x.device) < k_real[:, None, None]
    density = (-torch.where(near, knn**2, 0.0).sum(dim=-1) / k_real[:, None]).exp()
    rank = v.long().cumsum(1) - 1
    step = (1e-6 / n_real.clamp_min(1).double()).to(density.dtype)[:, None]
    density = density + (n_real[:, None] - 1 - rank).to(density.dtype) * step
    density = density.masked_fill(~v, -1.0)  # below every real density: padding is never denser
    denser = density.unsqueeze(1) > density.unsqueeze(2)
    dist_max = dist.masked_fill(~real_pair, 0.0).flatten(1).max(dim=1).values[:, None, None]
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    centres = (delta * density).masked_fill(~v, -torch.inf).topk(num_clusters, dim=-1).indices
    active = torch.arange(num_clusters, device=x.device).expand(bsz, num_clusters) < kept.unsqueeze(1)
    to_centre = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, n)).masked_fill(~active.unsqueeze(-1), torch.inf)
    labels, _ = _finish_padded(to_centre.argmin(dim=1), centres, kept, surplus, v, p, t, r, layout)
    return Merge(labels, t - r, weight_by_size=False, eps=1e-6, passthrough=p, valid=_slot_valid(labels, valid, t - r))


def dpc_knn(metric: Tensor, r: int, protected_tokens: int = 1, *, k: int = 5, layout: str = "published",
            valid: Tensor | None = None, **_: object) -> Merge:
    """DPC-KNN clustering (TCFormer's CTM, as in the published DPC-KNN models) of the unprotected tokens into
    ``T - p - r`` clusters.

    Distances ``cdist / sqrt(C)``; density ``exp(-mean of squared distances to the k nearest neighbours)``
    (the token itself included) plus a tie-breaking offset below ``1e-6`` (the published code adds uniform
    noise ``< 1e-6``; here it is deterministic, ``1e-6 * (n - 1 - i) / n`` for token ``i``, so results are
    reproducible); ``delta`` = distance to the nearest denser token (the largest distance for the densest);
    centres = top-K of ``delta * density``; every token joins its nearest centre, each centre its own cluster.

    The returned merge averages with token weights alone (``Merge.weight_by_size`` is false):
    ``sum(w x) / (sum(w) + 1e-6)`` per cluster; protected tokens are kept as they are. ``layout="published"``: slot ``p + k`` is the ``k``-th centre
    in descending score order; ``"spatial"``: slots numbered by their smallest token.

    ``valid (B, T)``: padding mask (module docstring): each sample's real tokens as alone (densities, distances
    and centres among them only); padding is never a centre.
    """
    _check_layout(layout)
    bsz, t, c = metric.shape
    p = protected_tokens
    valid = _check_valid(valid, metric, p)
    if valid is not None:
        return _dpc_knn_padded(metric, r, p, valid, k, layout)
    r = _check_r(r, t, p, max(t - p - 1, 0), "DPC-KNN")
    if r == 0:
        return identity_merge(bsz, t, metric.device)
    x = metric[:, p:].float()
    n = x.shape[1]
    num_clusters = n - r
    dist = torch.cdist(x, x) / (c**0.5)
    knn = dist.topk(min(k, n), dim=-1, largest=False).values
    density = (-(knn**2).mean(dim=-1)).exp()
    density = density + torch.arange(n - 1, -1, -1, device=x.device, dtype=density.dtype) * (1e-6 / n)
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: j is denser than i
    dist_max = dist.flatten(1).max(dim=1).values[:, None, None]
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    centres = (delta * density).topk(num_clusters, dim=-1).indices
    assign = _own_cluster(dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, n)).argmin(dim=1), centres)
    if layout == "spatial":
        assign = _relabel_by_first_token(assign, num_clusters)
    return Merge(_with_prefix(assign, p), t - r, weight_by_size=False, eps=1e-6, passthrough=p)


MergeMethod = Callable[..., Merge]

MERGE_METHODS: dict[str, MergeMethod] = {
    "atc": atc_merge,
    "tome": bipartite_soft_matching,
    "kmedoids": kmedoids,
    "dpcknn": dpc_knn,
}


def validate_keep_rate(keep_rate: float, name: str = "keep_rate") -> float:
    """Return ``keep_rate`` as a float, or raise ``ValueError`` naming ``name`` if it is not in ``(0, 1]``.

    A keep rate is the fraction of tokens kept at one reduction location (``0.9`` keeps 90%). This is the one
    check every entry point (CLIs, registered models, the detection backbone) applies, so they agree on the
    range and the wording.
    """
    try:
        value = float(keep_rate)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {keep_rate!r} is not a number: it is the fraction of tokens kept at each "
                         "reduction location, in (0, 1], e.g. 0.9") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} {keep_rate} is outside (0, 1]: it is the fraction of tokens kept at each "
                         "reduction location, e.g. 0.9")
    return value


def max_removable(method: str, num_tokens: int, protected_tokens: int = 1, masked: bool = False) -> int:
    """Largest ``r`` that ``method`` can remove from ``num_tokens`` tokens in one step.

    ``masked``: for a padded batch (``valid`` given), where a sample with padding keeps at least one padding slot
    next to at least one real one: one fewer at the extreme (``free - 2``; ToMe ``(free - 1) // 2``)."""
    free = num_tokens - protected_tokens
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {sorted(MERGE_METHODS)}")
    if method == "tome":
        return max((free - 1 if masked else free) // 2, 0)
    return max(free - (2 if masked else 1), 0)


def merge_by_method(method: str, metric: Tensor, r: int, protected_tokens: int = 1, **options: object) -> Merge:
    """Run the reduction method named ``method`` (see :data:`MERGE_METHODS`) removing exactly ``r`` tokens."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method](metric, r, protected_tokens, **options)
