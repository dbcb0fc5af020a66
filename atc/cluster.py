"""Agglomerative clustering of tokens on cosine distance, exact and batched.

Public entry point::

    labels = agglomerative_clustering(metric, num_clusters, linkage="average", backend="auto")

``metric`` is ``(B, T, C)``; the result is a ``LongTensor (B, T)`` on ``metric``'s device with labels in
``[0, num_clusters)``, numbered in order of each cluster's smallest token index (token 0 has label 0, the
next token that is not in cluster 0 starts cluster 1, ...).

Distances
    ``d(i, j) = 1 - cos(m_i, m_j)``, computed in float64 whatever the input dtype, clamped to ``[0, 2]``.
    A zero-norm token has cosine similarity 0 with every token, so its distance to any other token is 1.

Algorithm
    Every backend computes the classical agglomerative (Lance-Williams) hierarchy and cuts it at
    ``num_clusters``: the first ``T - num_clusters`` merges of the hierarchy, in order of merge height, are
    applied. This is exactly what ``sklearn.cluster.AgglomerativeClustering(n_clusters=K,
    metric="precomputed", linkage=L)`` returns (the published ATC code's reference), up to label order.

Tie-breaking (``torch``, ``numba`` and ``triton`` backends)
    Every cluster is represented by its smallest token index. At every step the pair of clusters at the
    smallest distance merges; among pairs at exactly equal distance the pair ``(i, j), i < j`` of
    representatives that is smallest in lexicographic order merges first. These backends implement this rule
    with identical float64 arithmetic, so they return identical labels even on exact ties (duplicate
    tokens). scipy, scikit-learn and fastcluster break exact ties in their own (documented-as-unspecified)
    ways; where no two candidate merges are at exactly the same height, all backends give the same partition.

Backends
    ``triton``: the GPU path. One Triton program per sample runs the whole merge loop (:mod:`atc._triton_cluster`);
    no host synchronisation, so a patched model can be captured in a CUDA graph. On CPU it is listed only under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). ``torch``: batched and vectorised over the batch on
    any device (the fallback on GPUs without Triton; launch-bound there). ``numba``: compiled nearest-neighbour
    Lance-Williams loop, parallel over the batch (the fastest on CPU). ``scipy``, ``sklearn``, ``fastcluster``:
    per-sample reference libraries. ``cuml``: RAPIDS (single linkage only). ``auto``: ``triton`` on CUDA when
    Triton is importable (else ``torch``), the fastest installed CPU backend on CPU; in both cases only among
    the backends that implement the linkage (see :class:`Linkage`).

NaN and inf
    A non-finite metric raises ``ValueError``. On CUDA the triton backend checks on the device instead of
    waiting for the GPU: the bad sample's labels are placeholders (``min(t, K - 1)``) and the error is raised by
    the next call on that device, or at once by :func:`check_nonfinite` (which synchronises). Calls with
    ``K = T`` or ``K = 1`` need no clustering; on CUDA with the triton backend their metric is not inspected.

Padding (``valid``)
    With ``valid (B, T)`` bool (True for real tokens), padded variable-length batches are clustered as if each sample
    were alone: padding never merges with a real token, and every sample still returns ``num_clusters = K``
    labels, so the batch stays rectangular. The rule (the same ``r = T - K`` for every sample): sample ``b`` with
    ``n_b`` real tokens clusters them into ``k_b = max(1, n_b - r)`` clusters (``0`` when it has none), i.e. it
    removes ``r`` of its real tokens, or all but one when it has no more than ``r`` -- what clustering that sample
    alone with ``r`` tokens to remove gives, which is what a ViT removing ``r`` tokens per block does to a sample
    run on its own. Real clusters get labels ``0..k_b-1`` (by smallest token, as above), padding the labels after
    them, one singleton per padding token in token order; when a sample gives up fewer than ``r`` real tokens
    (``n_b <= r``), its first padding tokens share one label so that the sample still has ``K`` labels (padding
    merges only with padding). ``K = 1`` leaves no label for padding and is refused when a sample has padding.
    The content of padding tokens is never read (NaN there is fine). The compiled backends and ``torch`` run the
    whole padded batch in one go (distances from padding to real tokens are +inf, between padding tokens above
    any real distance, so real merges come first and padding merges only with padding); ``scipy``, ``sklearn``,
    ``fastcluster`` and ``cuml`` cluster each sample's real tokens on their own, the reference. Without
    ``valid`` nothing of this runs.

Under ``torch.compile`` the call is the custom operator ``torch.ops.atc.agglomerative_clustering``, so compiled
models trace through it (``fullgraph=True`` works).

Threads (CPU)
    The numba backend's loop is parallel over the batch. Its threads belong to another OpenMP runtime than torch's
    (numba's pool uses the system ``libgomp``, torch wheels ship their own), and an OpenMP worker spin-waits after
    each parallel region: while torch's threads already occupy every core, a second runtime's workers take cores
    from them, and on busy cores that slows training severalfold. So the clustering uses **one thread** unless
    told otherwise: :func:`set_num_threads` (or the environment variable ``ATC_CLUSTER_THREADS``) is the one
    setting, e.g. ``set_num_threads(os.cpu_count())`` for large batches on idle cores when nothing else runs. It is
    capped at numba's own thread count. (Clustering is a small part of a ViT forward: at B=64, T=196 it costs a
    few milliseconds per call against seconds for the forward on CPU.)

Adding a linkage is one entry in :data:`LINKAGES`: a :class:`Linkage` with its Lance-Williams update runs on the
torch backend (any device) and reaches every patcher and CLI; giving it a ``scipy_method`` (or
``sklearn_linkage``, ``cuml_linkage``) that those libraries know adds their backends too. The backends that
do not have it refuse it, naming those that do, and ``auto`` picks one that has it. The compiled backends
need their own copy of the update, optional and only for speed: an id in ``_lance_williams`` and a loop in
``_BLOCKS`` of :mod:`atc._numba_cluster` (``numba_id``), a ``LINKAGE`` branch in :mod:`atc._triton_cluster`'s
kernel (``triton_id``); their loops assume a reducible linkage (a merged cluster is never closer to another
than the nearer of its parts), which the torch loop does not.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LINKAGES",
    "BACKENDS",
    "Linkage",
    "BackendUnavailableError",
    "agglomerative_clustering",
    "available_backends",
    "cosine_distance",
    "canonical_labels",
    "validate_linkage",
    "resolve_backend",
    "check_backend_linkage",
    "check_nonfinite",
    "real_clusters_first",
    "PADDING_DISTANCE",
    "set_num_threads",
    "get_num_threads",
]


class BackendUnavailableError(ValueError):
    """The requested clustering backend is not installed or cannot run on this device."""


# --------------------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------------------
_THREADS_ENV = "ATC_CLUSTER_THREADS"
_num_threads: int | None = None  # None: the environment variable, else 1


def _valid_threads(value: object, where: str) -> int:
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or (not isinstance(value, str) and n != value):
        raise ValueError(f"{where} must be a positive integer number of clustering threads, got {value!r}")
    return n


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads for CPU clustering (the numba backend), or ``None`` to return to the default: the
    environment variable ``ATC_CLUSTER_THREADS``, else 1 (see "Threads" in the module docstring for why one)."""
    global _num_threads
    if n is not None and not isinstance(n, numbers.Integral):
        raise ValueError(f"set_num_threads(n) must be a positive integer number of clustering threads, got {n!r}")
    _num_threads = None if n is None else _valid_threads(n, "set_num_threads(n)")


def get_num_threads() -> int:
    """Threads the CPU clustering uses (before the cap at numba's own thread count)."""
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get(_THREADS_ENV)
    return 1 if env in (None, "") else _valid_threads(env, _THREADS_ENV)


# --------------------------------------------------------------------------------------------------------------
# Linkages
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Linkage:
    """A Lance-Williams linkage, and which backends implement it.

    ``update(d_ak, d_bk, n_a, n_b)`` returns the distance from the merged cluster ``a ∪ b`` to every other
    cluster ``k`` given ``d(a, k)``, ``d(b, k)`` and the cluster sizes (tensors of any broadcastable shape); the
    ``torch`` backend runs it as given, so every linkage has that backend. The other fields name the linkage in
    the backends that have it built in, ``None`` where a backend does not (that backend then refuses it, naming
    the backends that can): ``numba_id`` and ``triton_id`` select a compiled update (the ids of
    :mod:`atc._numba_cluster` and :mod:`atc._triton_cluster`), ``scipy_method`` is the ``method`` of scipy's and
    fastcluster's ``linkage``, ``sklearn_linkage`` scikit-learn's ``linkage``, ``cuml_linkage`` RAPIDS cuML's.
    """

    name: str
    update: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    numba_id: int | None = None
    scipy_method: str | None = None
    sklearn_linkage: str | None = None
    triton_id: int | None = None
    cuml_linkage: str | None = None


def _single(d_ak: Tensor, d_bk: Tensor, n_a: Tensor, n_b: Tensor) -> Tensor:
    return torch.minimum(d_ak, d_bk)


def _complete(d_ak: Tensor, d_bk: Tensor, n_a: Tensor, n_b: Tensor) -> Tensor:
    return torch.maximum(d_ak, d_bk)


def _average(d_ak: Tensor, d_bk: Tensor, n_a: Tensor, n_b: Tensor) -> Tensor:
    # Same expression (and rounding) as scipy's and the numba backend's update.
    return (n_a * d_ak + n_b * d_bk) / (n_a + n_b)


LINKAGES: dict[str, Linkage] = {
    "single": Linkage("single", _single, 0, "single", "single", triton_id=0, cuml_linkage="single"),
    "complete": Linkage("complete", _complete, 1, "complete", "complete", triton_id=1),
    "average": Linkage("average", _average, 2, "average", "average", triton_id=2),
}


def validate_linkage(linkage: str) -> Linkage:
    """Return the :class:`Linkage` named ``linkage`` or raise a ValueError listing the known ones."""
    if not isinstance(linkage, str) or linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}: choose one of {sorted(LINKAGES)}")
    return LINKAGES[linkage]


# --------------------------------------------------------------------------------------------------------------
# Input checks and distances
# --------------------------------------------------------------------------------------------------------------
def _check_num_clusters(num_clusters: object, num_tokens: int) -> int:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (numbers.Integral, Tensor)):
        raise TypeError(f"num_clusters must be an integer, got {type(num_clusters).__name__} {num_clusters!r}")
    if isinstance(num_clusters, Tensor):
        if num_clusters.numel() != 1 or num_clusters.dtype.is_floating_point or num_clusters.dtype == torch.bool:
            raise TypeError(f"num_clusters must be an integer, got tensor {num_clusters!r}")
        num_clusters = int(num_clusters.item())
    k = int(num_clusters)
    if not 1 <= k <= num_tokens:
        raise ValueError(
            f"num_clusters must be between 1 and the number of tokens ({num_tokens}), got {k}"
        )
    return k


def _check_metric(metric: object) -> Tensor:
    if not isinstance(metric, Tensor):
        raise TypeError(f"metric must be a torch.Tensor of shape (B, T, C), got {type(metric).__name__}")
    if not metric.is_floating_point():
        raise TypeError(f"metric must have a floating-point dtype, got {metric.dtype}")
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape (B, T, C), got {metric.dim()} dimensions {tuple(metric.shape)}")
    if metric.shape[1] == 0:
        raise ValueError("metric has no tokens (T = 0): nothing to cluster")
    if metric.shape[2] == 0:
        raise ValueError("metric has no channels (C = 0): tokens cannot be compared")
    return metric


_NONFINITE = "metric contains NaN or infinite values"


def _check_finite(values: Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(_NONFINITE)


_WORKSPACE = threading.local()
_WORKSPACE_MAX_BYTES = 512 << 20


def _workspace(name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A float64 buffer reused across calls on CPU (one per name and thread, grown as needed, up to 512 MB).

    ViT blocks cluster tensors of the same shape again and again; writing into fresh memory each time costs
    a page fault per 4 KB, which is more than the arithmetic. CUDA has its own caching allocator.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel * 8 > _WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=torch.float64, device=device)
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel:
        buf = buffers[name] = torch.empty(numel, dtype=torch.float64)
    return buf[:numel].view(shape)


def _unit_rows(metric: Tensor, check: bool = True) -> Tensor:
    """L2-normalise tokens in float64; zero-norm tokens stay zero (cosine similarity 0 with everything).

    ``check``: raise on NaN/inf (a host synchronisation on CUDA; the triton backend checks on the device
    instead, where a non-finite token shows up as NaN in its row of the result).
    The result lives in a reused workspace (see :func:`_workspace`): consume it before the next call.
    """
    m = _workspace("unit", tuple(metric.shape), metric.device)
    m.copy_(metric.detach())
    tiny = torch.finfo(torch.float64).tiny
    if metric.dtype == torch.float64:
        # Squares of float64 values can over/underflow: scale by the largest magnitude first. Narrower
        # dtypes cannot once converted to float64.
        scale = m.abs().amax(dim=-1, keepdim=True)
        if check:  # NaN and inf propagate to the row maximum: a (B, T) check instead of (B, T, C)
            _check_finite(scale)
        m.div_(scale.clamp_min_(tiny))
    norm = torch.linalg.vector_norm(m, dim=-1, keepdim=True)
    if check:  # finite narrower values cannot overflow a float64 norm
        _check_finite(norm)
    return m.div_(norm.clamp_min_(tiny))


def _block_bounds(t: int, device: torch.device) -> list[tuple[int, int]]:
    """Row blocks ``[s, e)`` of the Gram matrix; block ``[s, e)`` is computed against columns ``[s, T)`` only.

    On CPU four blocks skip 3/8 of the products; on a GPU one ``bmm`` is cheaper than four launches and the
    square it gives is what the triton backend works on.
    """
    nb = 4 if t >= 32 and device.type == "cpu" else 1
    cuts = [round(t * i / nb) for i in range(nb + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _gram_blocks(metric: Tensor, check: bool = True) -> tuple[Tensor, list[tuple[int, int]]]:
    """Float64 cosine similarities of the upper block triangle, packed in one flat buffer.

    For each row block ``[s, e)`` of :func:`_block_bounds`, the products of rows ``[s, e)`` with tokens
    ``[s, T)`` are stored contiguously as ``(B, e - s, T - s)``; blocks below the diagonal are never computed
    (with 4 blocks that saves 3/8 of the products). The buffer is a reused workspace: consume it before the
    next call. These are the values every backend starts from.

    Returns the flat buffer and the block bounds.
    """
    m = _unit_rows(metric, check)
    bsz, t, _ = m.shape
    bounds = _block_bounds(t, m.device)
    total = sum(bsz * (e - s) * (t - s) for s, e in bounds)
    flat = _workspace("gram", (total,), m.device)
    offset = 0
    for s, e in bounds:
        size = bsz * (e - s) * (t - s)
        torch.bmm(m[:, s:e], m[:, s:].transpose(1, 2), out=flat[offset:offset + size].view(bsz, e - s, t - s))
        offset += size
    return flat, bounds


def _block_views(flat: Tensor, bounds: list[tuple[int, int]], bsz: int, t: int) -> list[Tensor]:
    views, offset = [], 0
    for s, e in bounds:
        size = bsz * (e - s) * (t - s)
        views.append(flat[offset:offset + size].view(bsz, e - s, t - s))
        offset += size
    return views


def _chunk_size(bsz: int, t: int, device: torch.device) -> int:
    """Samples per chunk for the CPU backends (the same for all of them, so they see identical values).

    Chunks of about _CHUNK_BYTES keep the Gram blocks in cache between their computation and the
    clustering; equal, even-sized chunks keep both halves of the two-thread pool busy.
    """
    if device.type != "cpu":
        return max(bsz, 1)
    chunks = max(1, math.ceil(bsz * t * t * 8 / _CHUNK_BYTES))
    size = math.ceil(bsz / chunks)
    return max(2, size + size % 2)


def _fill_distances(metric: Tensor, out: Tensor, inf_diagonal: bool) -> Tensor:
    """Write ``clamp(1 - cos, 0, 2)`` into ``out`` (B, T, T), a few samples at a time; the diagonal is 0, or
    +inf for the clustering loops. The matrix is the exact mirror of its upper triangle, which is all the
    numba backend reads, so every backend sees the same value for a pair either way round."""
    bsz, t, _ = metric.shape
    chunk = _chunk_size(bsz, t, metric.device)
    for start in range(0, bsz, chunk):
        part = out[start:start + chunk]
        flat, bounds = _gram_blocks(metric[start:start + chunk])
        for (s, e), block in zip(bounds, _block_views(flat, bounds, part.shape[0], t)):
            part[:, s:e, s:] = block
            part[:, e:, s:e] = block[:, :, e - s:].transpose(1, 2)
            square = part[:, s:e, s:e]
            upper = torch.ones(e - s, e - s, dtype=torch.bool, device=out.device).triu()
            square.copy_(torch.where(upper, square, square.transpose(1, 2)))
    out.neg_().add_(1.0).clamp_(0.0, 2.0)
    out.diagonal(dim1=1, dim2=2).fill_(float("inf") if inf_diagonal else 0.0)
    return out


def _distance_matrix(metric: Tensor, inf_diagonal: bool) -> Tensor:
    bsz, t, _ = metric.shape
    out = torch.empty(bsz, t, t, dtype=torch.float64, device=metric.device)
    return _fill_distances(metric, out, inf_diagonal)


def cosine_distance(metric: Tensor) -> Tensor:
    """Cosine distances ``1 - cos(m_i, m_j)`` between tokens: ``(B, T, C) -> (B, T, T)`` float64.

    Values lie in ``[0, 2]`` with a zero diagonal; a zero-norm token is at distance 1 from every other token.
    """
    with torch.no_grad():
        return _distance_matrix(_check_metric(metric), inf_diagonal=False)


def canonical_labels(labels: Tensor) -> Tensor:
    """Renumber cluster labels ``(B, T)`` in order of each cluster's smallest token index."""
    labels = labels.long()
    bsz, t = labels.shape
    n = int(labels.max()) + 1 if labels.numel() else 0
    first = torch.full((bsz, max(n, 1)), t, dtype=torch.long, device=labels.device)
    pos = torch.arange(t, device=labels.device).expand(bsz, t)
    first.scatter_reduce_(1, labels, pos, reduce="amin")
    order = first.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=labels.device).expand_as(order))
    return rank.gather(1, labels)


def _labels_from_parent(parent: Tensor) -> Tensor:
    """Labels from parent pointers (``parent[t] <= t``; roots point to themselves), numbered by root order."""
    steps = max(1, int(np.ceil(np.log2(max(parent.shape[1], 2)))))
    for _ in range(steps + 1):
        parent = parent.gather(1, parent)
    idx = torch.arange(parent.shape[1], device=parent.device)
    ids = (parent == idx).long().cumsum(1) - 1
    return ids.gather(1, parent)


# --------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------
# CPU backends work on chunks of samples whose Gram blocks fit in a reused workspace of about this size.
_CHUNK_BYTES = 8 << 20

def _cluster_torch(metric: Tensor, k: int, linkage: Linkage, dense_repair: bool | None = None,
                   valid: Tensor | None = None) -> Tensor:
    """Batched nearest-neighbour-list Lance-Williams clustering in torch (one step merges in every sample).

    Same merge rule and arithmetic as the numba backend. ``dense_repair`` recomputes the nearest neighbours
    of all rows at every step instead of gathering the rows that need it; that avoids a device sync per step
    and is the default on CUDA. ``valid (B, T)``: padding mask (see the module docstring), applied to the
    distances by :func:`_mask_distances`.
    """
    device = metric.device
    bsz, t, _ = metric.shape
    if dense_repair is None:
        dense_repair = device.type != "cpu"
    d = _fill_distances(metric, _workspace("distances", (bsz, t, t), device), inf_diagonal=True)
    if valid is not None:
        _mask_distances(d, valid)
    rows2d = d.view(bsz * t, t)
    batch = torch.arange(bsz, device=device)
    row_base = batch * t
    size = torch.ones(bsz, t, dtype=torch.float64, device=device)
    parent = torch.arange(t, device=device).repeat(bsz, 1)
    nnd, nn = d.min(dim=2)
    inf = float("inf")
    # +inf at merged-away clusters. On CPU their columns are masked with it instead of being overwritten
    # (a strided write across the whole (B, T, T) matrix, the most expensive step there).
    dead = torch.zeros(bsz, t, dtype=torch.float64, device=device)
    for _ in range(t - k):
        i = nnd.argmin(dim=1, keepdim=True)
        j = nn.gather(1, i)
        a, b = torch.minimum(i, j), torch.maximum(i, j)  # (B, 1)
        ra, rb = row_base + a.squeeze(1), row_base + b.squeeze(1)
        n_a, n_b = size.gather(1, a), size.gather(1, b)
        new = linkage.update(rows2d.index_select(0, ra), rows2d.index_select(0, rb), n_a, n_b)
        dead.scatter_(1, b, inf)
        new.add_(dead)  # +0 is exact; merged-away clusters (b included) read +inf
        new.scatter_(1, a, inf)
        rows2d.index_copy_(0, ra, new)
        d[batch, :, a.squeeze(1)] = new
        if dense_repair:  # row b is never read again; its column must read +inf for the dense repair
            d[batch, :, b.squeeze(1)] = inf
        size.scatter_add_(1, a, n_b)
        parent.scatter_(1, b, a)
        nnd.scatter_(1, b, inf)
        # Row a's nearest neighbour comes from the row just written (it already reads +inf where it should).
        nnd_a, nn_a = new.min(dim=1, keepdim=True)
        # Other rows whose neighbour was a or b need a rescan (not merged-away rows, whose nnd is +inf).
        stale = (nn == a).logical_or_(nn == b).logical_and_(nnd != inf).scatter_(1, a, False)
        better = torch.where(new == nnd, a < nn, new < nnd).logical_and_(stale.logical_not())
        nn = torch.where(better, a, nn)
        nnd = torch.where(better, new, nnd)
        if dense_repair:
            rd, rn = d.min(dim=2)
            nnd = torch.where(stale, rd, nnd)
            nn = torch.where(stale, rn, nn)
        else:
            idx = stale.view(-1).nonzero().squeeze(1)
            rd, rn = (rows2d.index_select(0, idx) + dead.index_select(0, idx // t)).min(dim=1)
            nnd.view(-1).index_copy_(0, idx, rd)
            nn.view(-1).index_copy_(0, idx, rn)
        nnd.scatter_(1, a, nnd_a)
        nn.scatter_(1, a, nn_a)
    return _labels_from_parent(parent)


#: Distance between two padding tokens: above every real distance (at most 2), so a sample's real tokens merge
#: first and padding merges only with padding (real-to-padding distances are +inf). Every linkage maps two equal
#: distances to the same value exactly, so merged padding stays at this distance.
PADDING_DISTANCE = 3.0


def _mask_distances(d: Tensor, valid: Tensor) -> Tensor:
    """Apply the padding mask ``valid (B, T)`` to distances ``d (B, T, T)`` in place: +inf between a real and a
    padding token, :data:`PADDING_DISTANCE` between two padding tokens; the diagonal is left as it is."""
    diag = d.diagonal(dim1=1, dim2=2).clone()
    real_pair = valid[:, :, None] & valid[:, None, :]
    pad_pair = ~(valid[:, :, None] | valid[:, None, :])
    d.masked_fill_(~real_pair, float("inf")).masked_fill_(pad_pair, PADDING_DISTANCE)
    d.diagonal(dim1=1, dim2=2).copy_(diag)
    return d


def _per_sample_distances(metric: Tensor) -> np.ndarray:
    return _distance_matrix(metric, inf_diagonal=False).cpu().numpy()


def _cut_linkage_matrix(z: np.ndarray, t: int, k: int) -> np.ndarray:
    """Apply the first ``t - k`` merges of a scipy-format linkage matrix; labels by smallest token index."""
    parent = np.arange(2 * t - 1)
    for step in range(t - k):
        parent[int(z[step, 0])] = t + step
        parent[int(z[step, 1])] = t + step
    root = np.arange(t)
    for i in range(t):
        r = i
        while parent[r] != r:
            r = parent[r]
        root[i] = r
    _, first_idx, inverse = np.unique(root, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_idx))
    return order[inverse]


def _cluster_scipy(metric: Tensor, k: int, linkage: Linkage) -> Tensor:
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    dist = _per_sample_distances(metric)
    t = dist.shape[1]
    out = np.empty(dist.shape[:2], dtype=np.int64)
    for b in range(dist.shape[0]):
        z = scipy_linkage(squareform(dist[b], checks=False), method=linkage.scipy_method)
        out[b] = _cut_linkage_matrix(z, t, k)
    return torch.from_numpy(out)


def _cluster_fastcluster(metric: Tensor, k: int, linkage: Linkage) -> Tensor:
    import fastcluster
    from scipy.spatial.distance import squareform

    dist = _per_sample_distances(metric)
    t = dist.shape[1]
    out = np.empty(dist.shape[:2], dtype=np.int64)
    for b in range(dist.shape[0]):
        z = fastcluster.linkage(squareform(dist[b], checks=False), method=linkage.scipy_method, preserve_input=False)
        out[b] = _cut_linkage_matrix(z, t, k)
    return torch.from_numpy(out)


def _cluster_sklearn(metric: Tensor, k: int, linkage: Linkage) -> Tensor:
    from sklearn.cluster import AgglomerativeClustering

    dist = _per_sample_distances(metric)
    out = np.empty(dist.shape[:2], dtype=np.int64)
    for b in range(dist.shape[0]):
        model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage.sklearn_linkage)
        out[b] = model.fit_predict(dist[b])
    return canonical_labels(torch.from_numpy(out))


def _cluster_numba(metric: Tensor, k: int, linkage: Linkage, valid: Tensor | None = None) -> Tensor:
    import numba

    torch_threads = torch.get_num_threads()
    want, previous = min(get_num_threads(), numba.config.NUMBA_NUM_THREADS), numba.get_num_threads()
    if want != previous:
        numba.set_num_threads(want)
    try:
        return _cluster_numba_chunks(metric, k, linkage, valid)
    finally:
        if want != previous:
            numba.set_num_threads(previous)
        # numba's OpenMP layer sets the process's OpenMP thread count (when it starts, and with its thread
        # setting), which torch reads as its own: put torch's back
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def _cluster_numba_chunks(metric: Tensor, k: int, linkage: Linkage, valid: Tensor | None) -> Tensor:
    from atc._numba_cluster import cluster_gram_blocks

    metric = metric.cpu()
    bsz, t, _ = metric.shape
    labels = np.empty((bsz, t), dtype=np.int64)
    # (B, 0): no mask; the kernel masks each row as it turns it into distances (see _mask_distances)
    mask = np.empty((bsz, 0), dtype=np.uint8) if valid is None else valid.cpu().to(torch.uint8).numpy()
    chunk = _chunk_size(bsz, t, metric.device)
    for start in range(0, bsz, chunk):
        flat, bounds = _gram_blocks(metric[start:start + chunk])
        # The kernel turns the similarities into the distances of _fill_distances itself, sample by sample.
        cluster_gram_blocks(flat.numpy(), np.asarray(bounds, dtype=np.int64), k, linkage.numba_id,
                            labels[start:start + chunk], mask[start:start + chunk])
    return torch.from_numpy(labels)


def _gram_square(metric: Tensor, check: bool) -> Tensor:
    """The similarities of :func:`_gram_blocks` as one ``(B, T, T)`` square per sample, upper triangle (with
    the diagonal) filled; on a GPU that is the single block itself, no copy."""
    bsz, t, _ = metric.shape
    flat, bounds = _gram_blocks(metric, check)
    if len(bounds) == 1:
        return flat.view(bsz, t, t)
    square = torch.empty(bsz, t, t, dtype=torch.float64, device=metric.device)
    for (s, e), block in zip(bounds, _block_views(flat, bounds, bsz, t)):
        square[:, s:e, s:] = block
    return square


class _DeviceNonFinite:
    """NaN/inf reported by the triton kernel without stalling the GPU.

    The kernel sets ``flag`` on the device; after each launch a non-blocking copy brings it to pinned host
    memory, and the *next* call on that device reads the host copy (a plain memory read, no synchronisation) and
    raises. So a bad metric is reported one call late, never lost; :func:`check_nonfinite` reports at once (it
    synchronises). Inside CUDA-graph capture the copy is skipped and the flag waits on the device for the next
    eager call or ``check_nonfinite``.
    """

    def __init__(self, device: torch.device) -> None:
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        pinned = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=pinned)

    def raise_if_set(self, host_value: int) -> None:
        if host_value:
            self.flag.zero_()
            self.host.zero_()
            raise ValueError(
                f"{_NONFINITE} (found on {self.flag.device} by an earlier agglomerative_clustering call: the GPU "
                f"path checks without waiting for the GPU, so it reports one call late; that call's labels for "
                f"the bad samples were placeholders, min(token, K - 1). Call atc.cluster.check_nonfinite() "
                f"after a call to check at once)")

    def after_launch(self) -> None:
        if self.flag.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return
        self.host.copy_(self.flag, non_blocking=True)


_NONFINITE_FLAGS: dict[torch.device, _DeviceNonFinite] = {}


def _nonfinite_flags(device: torch.device) -> _DeviceNonFinite:
    flags = _NONFINITE_FLAGS.get(device)
    if flags is None:
        flags = _NONFINITE_FLAGS[device] = _DeviceNonFinite(device)
    return flags


def check_nonfinite(device: torch.device | str | None = None) -> None:
    """Raise ``ValueError`` now if a triton-backend call on ``device`` (default: every device used so far) saw
    a NaN/inf metric. Synchronises with that device; the clustering call itself never does (see
    :class:`_DeviceNonFinite`)."""
    if device is None:
        devices = list(_NONFINITE_FLAGS)
    else:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors always carry the index
            device = torch.device("cuda", torch.cuda.current_device())
        devices = [device]
    for dev in devices:
        flags = _NONFINITE_FLAGS.get(dev)
        if flags is not None:
            flags.raise_if_set(int(flags.flag.item()))


def _defers_checks(device: torch.device) -> bool:
    """Whether input checks that would wait for ``device`` are done on the device instead (the triton path)."""
    return device.type == "cuda"


def _cluster_triton(metric: Tensor, k: int, linkage: Linkage, valid: Tensor | None = None) -> Tensor:
    from atc._triton_cluster import MAX_TOKENS, cluster_gram

    if metric.shape[1] > MAX_TOKENS:
        raise ValueError(
            f"the triton clustering backend supports at most {MAX_TOKENS} tokens per sample (its per-token state "
            f"lives in one program's registers), got T = {metric.shape[1]}: use backend='torch'")
    deferred = _defers_checks(metric.device)
    flags = _nonfinite_flags(metric.device)
    if deferred:
        flags.raise_if_set(int(flags.host[0]))  # host memory: no synchronisation
    labels = cluster_gram(_gram_square(metric, check=not deferred), k, linkage.triton_id, flags.flag, valid=valid)
    flags.after_launch()
    return labels


def _cluster_cuml(metric: Tensor, k: int, linkage: Linkage) -> Tensor:
    from cuml.cluster import AgglomerativeClustering  # type: ignore[import-not-found]

    unit = _unit_rows(metric).to(torch.float32)
    out = []
    for b in range(unit.shape[0]):
        model = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage=linkage.cuml_linkage,
                                        connectivity="pairwise")
        labels = model.fit_predict(unit[b])
        out.append(torch.as_tensor(np.asarray(labels.get() if hasattr(labels, "get") else labels), dtype=torch.long))
    return canonical_labels(torch.stack(out).to(metric.device))


@dataclass(frozen=True)
class _Backend:
    run: Callable[..., Tensor]
    modules: tuple[str, ...]
    # The Linkage field this backend reads: a linkage whose field is None is one the backend does not have.
    linkage_field: str
    needs_cuda: bool = False
    # Usable without CUDA when this environment variable is "1" (Triton's interpreter runs kernels on CPU).
    cpu_env: str | None = None
    # Takes the padding mask itself (``run(metric, k, linkage, valid=...)``) and clusters the padded batch in one
    # go; the others are run on each sample's real tokens.
    masks: bool = False


BACKENDS: dict[str, _Backend] = {
    "torch": _Backend(_cluster_torch, (), "update", masks=True),
    "triton": _Backend(_cluster_triton, ("triton",), "triton_id", needs_cuda=True, cpu_env="TRITON_INTERPRET",
                       masks=True),
    "numba": _Backend(_cluster_numba, ("numba",), "numba_id", masks=True),
    "scipy": _Backend(_cluster_scipy, ("scipy",), "scipy_method"),
    "sklearn": _Backend(_cluster_sklearn, ("sklearn",), "sklearn_linkage"),
    "fastcluster": _Backend(_cluster_fastcluster, ("fastcluster",), "scipy_method"),
    "cuml": _Backend(_cluster_cuml, ("cuml",), "cuml_linkage", needs_cuda=True),
}

# Fastest first, as measured by benchmark_atc_framework.py on CPU.
_CPU_FASTEST_FIRST = ("numba", "fastcluster", "scipy", "torch")


@functools.lru_cache(maxsize=None)
def _importable(modules: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _installed(backend: str) -> bool:
    spec = BACKENDS[backend]
    if spec.needs_cuda and not torch.cuda.is_available():
        if spec.cpu_env is None or os.environ.get(spec.cpu_env) != "1":
            return False
    return _importable(spec.modules)


def _supports(backend: str, link: Linkage) -> bool:
    return getattr(link, BACKENDS[backend].linkage_field) is not None


def available_backends(linkage: str | None = None) -> list[str]:
    """Names of the backends usable on this machine (``auto`` not included); with ``linkage``, only those that
    implement it (see :class:`Linkage`)."""
    link = None if linkage is None else validate_linkage(linkage)
    return [name for name in BACKENDS if _installed(name) and (link is None or _supports(name, link))]


def _unsupported_linkage(backend: str, link: Linkage) -> ValueError:
    has = [name for name, other in LINKAGES.items() if _supports(backend, other)]
    can = [name for name in BACKENDS if _supports(name, link)]
    here = [name for name in can if _installed(name)]
    return ValueError(
        f"the {backend} clustering backend does not implement {link.name!r} linkage (it has "
        f"{has[0] + ' linkage only' if len(has) == 1 else ', '.join(has) or 'none'}); {link.name!r} linkage is implemented "
        f"by the {', '.join(can)} backends (installed here: {', '.join(here) or 'none'}): pass one of those, "
        f"or backend='auto'")


def check_backend_linkage(backend: str, linkage: str) -> None:
    """Raise ``ValueError`` now if ``backend`` is named (not ``"auto"``) and does not implement ``linkage``, naming
    the backends that do; for callers that fix both long before clustering (the patchers)."""
    link = validate_linkage(linkage)
    if backend != "auto" and backend in BACKENDS and not _supports(backend, link):
        raise _unsupported_linkage(backend, link)


def resolve_backend(backend: str, device: torch.device | str = "cpu", linkage: str | Linkage | None = None) -> str:
    """Map ``backend`` (a name or ``"auto"``) to a concrete installed backend for ``device``.

    With ``linkage``, ``"auto"`` picks a backend that implements it, and a named backend that does not raises
    ``ValueError`` naming the backends that do.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"unknown backend {backend!r}: choose 'auto' or one of {list(BACKENDS)}")
    link = validate_linkage(linkage) if isinstance(linkage, str) else linkage
    if backend == "auto":
        if torch.device(device).type == "cuda":
            if _installed("triton") and (link is None or _supports("triton", link)):
                return "triton"
            return "torch"
        if torch.device(device).type != "cpu":
            return "torch"
        # torch implements every linkage, so the search always ends.
        return next(b for b in _CPU_FASTEST_FIRST if _installed(b) and (link is None or _supports(b, link)))
    if link is not None and not _supports(backend, link):  # first: installing the backend would not help
        raise _unsupported_linkage(backend, link)
    if not _installed(backend):
        raise BackendUnavailableError(f"clustering backend {backend!r} is not available here: it needs "
                                      f"{_BACKEND_NEEDS.get(backend, _pip_hint(backend))}")
    if backend == "triton" and torch.device(device).type not in ("cuda", "cpu"):
        raise BackendUnavailableError(f"the triton backend runs on CUDA devices (or on CPU under "
                                      f"TRITON_INTERPRET=1), got device {torch.device(device)}")
    return backend


def _pip_hint(backend: str) -> str:
    return f"`pip install {' '.join(BACKENDS[backend].modules).replace('sklearn', 'scikit-learn')}`"


_BACKEND_NEEDS = {
    "cuml": "a CUDA GPU and RAPIDS cuML (requirements/rapids.txt)",
    "triton": "Triton (it comes with CUDA builds of torch) and a CUDA GPU, or TRITON_INTERPRET=1 set before "
              "importing atc to run its kernel on CPU through Triton's interpreter (slow; for tests)",
}


def agglomerative_clustering(
    metric: Tensor, num_clusters: int, linkage: str = "average", backend: str = "auto",
    valid: Tensor | None = None,
) -> Tensor:
    """Cluster the tokens of every sample into ``num_clusters`` clusters.

    Args:
        metric: ``(B, T, C)`` token features, any float dtype and device.
        num_clusters: ``K`` with ``1 <= K <= T``.
        linkage: a key of :data:`LINKAGES` (``"single"``, ``"complete"``, ``"average"``).
        backend: ``"auto"`` (the fastest installed backend for ``metric``'s device that implements ``linkage``)
            or one of :func:`available_backends`; a backend that does not implement ``linkage`` raises
            ``ValueError`` naming those that do.
        valid: optional ``(B, T)`` bool, True for real tokens and False for padding. Each sample's real tokens
            are then clustered as that sample alone with ``r = T - K`` tokens to remove (into ``max(1, n_b - r)``
            clusters) and padding never merges with them; every sample still has ``K`` labels: real clusters
            first, then padding (see the module docstring for the rule). ``None``: no padding.

    Returns:
        ``LongTensor (B, T)`` on ``metric.device``; labels in ``[0, K)`` numbered by smallest token index (with
        ``valid``: real clusters by smallest token, then padding).

    Under ``torch.compile`` this is the custom operator ``torch.ops.atc.agglomerative_clustering`` (its fake
    implementation gives the ``(B, T)`` shape), so compiled models trace through it without a graph break.
    """
    if torch.compiler.is_compiling():
        return torch.ops.atc.agglomerative_clustering(metric, num_clusters, linkage, backend, valid)
    return _agglomerative_clustering(metric, num_clusters, linkage, backend, valid)


def _agglomerative_clustering(metric: Tensor, num_clusters: int, linkage: str, backend: str,
                              valid: Tensor | None = None) -> Tensor:
    link = validate_linkage(linkage)
    metric = _check_metric(metric)
    bsz, t, _ = metric.shape
    k = _check_num_clusters(num_clusters, t)
    name = resolve_backend(backend, metric.device, link)
    if valid is not None:
        return _masked_clustering(metric, k, link, name, _check_valid(valid, bsz, t, metric.device))
    if bsz == 0:
        return torch.empty(0, t, dtype=torch.long, device=metric.device)
    # K = T and K = 1 need no distances. Their metric is still checked, except where that would wait for the
    # GPU (the labels do not depend on it).
    if k in (1, t) and not (name == "triton" and _defers_checks(metric.device)):
        _check_finite(metric)
    if k == t:
        return torch.arange(t, device=metric.device).repeat(bsz, 1)
    if k == 1:
        return torch.zeros(bsz, t, dtype=torch.long, device=metric.device)
    with torch.no_grad():
        labels = BACKENDS[name].run(metric, k, link)
    return labels.to(metric.device)


def _check_valid(valid: object, bsz: int, t: int, device: torch.device) -> Tensor:
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        what = f"dtype {valid.dtype}" if isinstance(valid, Tensor) else type(valid).__name__
        raise TypeError(f"valid must be a bool tensor (B, T), True for real tokens and False for padding; got {what}"
                        f" (convert an attention mask with mask.bool())")
    if tuple(valid.shape) != (bsz, t):
        raise ValueError(f"valid must have the metric's (B, T) = {(bsz, t)} shape, got {tuple(valid.shape)}")
    return valid.to(device)


def real_clusters_first(labels: Tensor, valid: Tensor, k: int) -> Tensor:
    """Renumber labels ``(B, T)`` in ``[0, k)`` whose clusters are all-real or all-padding (``valid (B, T)``):
    real clusters first, then padding ones, each group keeping its order. Static shapes, no host
    synchronisation."""
    holds_real = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    holds_real.scatter_reduce_(1, labels, valid.long(), reduce="amax")
    pad = 1 - holds_real
    rank = torch.where(holds_real.bool(), holds_real.cumsum(1) - holds_real,
                       holds_real.sum(1, keepdim=True) + pad.cumsum(1) - pad)
    return rank.gather(1, labels)


def _padding_labels(num_padding: int, removed: int, kept_real: int, num_real: int) -> Tensor:
    """Labels of one sample's padding tokens in token order: singletons after the real clusters, the first ones
    sharing a label when the real tokens gave up fewer than ``removed`` (the rule of the module docstring)."""
    surplus = removed - (num_real - kept_real)
    return kept_real + (torch.arange(num_padding) - surplus).clamp_min(0)


def _masked_clustering(metric: Tensor, k: int, link: Linkage, name: str, valid: Tensor) -> Tensor:
    bsz, t, _ = metric.shape
    if bsz == 0:
        return torch.empty(0, t, dtype=torch.long, device=metric.device)
    if k == 1 and not bool(valid.all()):  # the only case that reads the mask on the host
        raise ValueError("num_clusters=1 leaves no cluster for padding tokens (valid has False entries), and padding "
                         "never merges with real tokens: use num_clusters >= 2")
    # Padding is never read: whatever it holds (NaN included) cannot reach a real token's distances.
    metric = metric.masked_fill(~valid.unsqueeze(-1), 0.0)
    if k in (1, t) and not (name == "triton" and _defers_checks(metric.device)):
        _check_finite(metric)
    if k == 1:
        return torch.zeros(bsz, t, dtype=torch.long, device=metric.device)
    if k == t:  # nothing merges: real tokens first, then padding, each in token order
        return real_clusters_first(torch.arange(t, device=metric.device).repeat(bsz, 1), valid, t)
    spec = BACKENDS[name]
    with torch.no_grad():
        if spec.masks:
            return real_clusters_first(spec.run(metric, k, link, valid=valid).to(metric.device), valid, k)
        # The reference libraries: each sample's real tokens on their own, padding labelled after them.
        removed = t - k
        out = torch.empty(bsz, t, dtype=torch.long)
        for b, row in enumerate(valid.cpu()):
            real, padding = row.nonzero().squeeze(1), (~row).nonzero().squeeze(1)
            n = len(real)
            kept = max(1, n - removed) if n else 0
            if n:
                out[b, real] = _agglomerative_clustering(metric[b:b + 1, real.to(metric.device)], kept, link.name,
                                                         name).cpu()[0]
            out[b, padding] = _padding_labels(len(padding), removed, kept, n)
    return out.to(metric.device)


@torch.library.custom_op("atc::agglomerative_clustering", mutates_args=())
def _clustering_op(metric: Tensor, num_clusters: int, linkage: str, backend: str,
                   valid: Optional[Tensor] = None) -> Tensor:
    return _agglomerative_clustering(metric, num_clusters, linkage, backend, valid)


@_clustering_op.register_fake
def _clustering_op_fake(metric: Tensor, num_clusters: int, linkage: str, backend: str,
                        valid: Optional[Tensor] = None) -> Tensor:
    return metric.new_empty(metric.shape[:2], dtype=torch.long)
