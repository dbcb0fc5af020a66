"""Compiled CPU backend: nearest-neighbour-list Lance-Williams clustering, parallel over the batch.

Input is the float64 cosine-similarity matrix that every backend starts from (:func:`atc.cluster._gram_blocks`).
The merge rule, tie-breaking and float64 arithmetic are the same as the torch backend in :mod:`atc.cluster`, so
both return identical labels, even on exact ties.

Per sample the cost is O(T^2) to build distances and initial nearest neighbours, then O(T) per merge plus half
a row for each stale row that reaches the front of the queue.

Padding (``valid``): each row is masked as it is turned into distances (+inf between a real and a padding token,
``PADDING_DISTANCE`` between two padding tokens, as ``atc.cluster._mask_distances``); the merge loop is the same.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

SINGLE, COMPLETE, AVERAGE = 0, 1, 2
#: Distance between two padding tokens (``atc.cluster.PADDING_DISTANCE``): above every real distance.
PADDING_DISTANCE = 3.0


@njit(cache=True, inline="always", error_model="numpy")
def _lance_williams(linkage: int, d_ak: float, d_bk: float, n_a: float, n_b: float) -> float:
    if linkage == SINGLE:
        return min(d_ak, d_bk)
    if linkage == COMPLETE:
        return max(d_ak, d_bk)
    return (n_a * d_ak + n_b * d_bk) / (n_a + n_b)


@intrinsic
def _fmin(typingctx, a, b):
    """``min(a, b)`` as LLVM's ``minnum`` marked no-NaN/no-signed-zero, so that min-reductions vectorise
    (numba's ``min`` lowers to compare-and-select, which LLVM leaves scalar). Exact on the values the kernel
    holds: no NaN ever reaches it, and the sign of a zero, which it may drop, is invisible to comparisons."""
    sig = types.float64(types.float64, types.float64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), ir.DoubleType()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.minnum.f64")
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return sig, codegen


@njit(cache=True, nogil=True, error_model="numpy")
def _row_min(row: np.ndarray) -> float:
    best = np.inf
    for p in range(row.shape[0]):
        best = _fmin(best, row[p])
    return best


@njit(cache=True, nogil=True, error_model="numpy")
def _to_distances(row: np.ndarray) -> float:
    """Turn cosine similarities g into the distances clamp(1 - g, 0, 2) of _fill_distances, in place, and
    return the row's minimum (+inf when empty): one vectorised pass."""
    best = np.inf
    for p in range(row.shape[0]):
        v = min(max(1.0 - row[p], 0.0), 2.0)
        row[p] = v
        best = _fmin(best, v)
    return best


@njit(cache=True, nogil=True, error_model="numpy")
def _mask_row(row: np.ndarray, valid: np.ndarray, i: int) -> float:
    """Mask row ``i``'s distances to tokens ``j = i + 1, ...`` in place (padding mask ``valid``, uint8) and return
    the row's new minimum."""
    best = np.inf
    vi = valid[i] != 0
    for p in range(row.shape[0]):
        vj = valid[i + 1 + p] != 0
        if not (vi and vj):
            row[p] = np.inf if (vi or vj) else PADDING_DISTANCE
        best = _fmin(best, row[p])
    return best


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _first_index(row: np.ndarray, value: float) -> tuple[int, float]:
    """First index holding ``value``, the row's minimum (``(0, inf)`` when that is +inf: nothing to merge)."""
    if value == np.inf:
        return 0, value
    p = 0
    while row[p] != value:
        p += 1
    return p, value


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _row_argmin(row: np.ndarray) -> tuple[int, float]:
    """First index of the minimum (merged-away clusters and the diagonal hold +inf, so they never win):
    a vectorised minimum, then a scan that stops at its first occurrence."""
    return _first_index(row, _row_min(row))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _tail_argmin(d: np.ndarray, row: int, start: int, stop: int) -> tuple[int, float]:
    """First column ``k`` in ``[start, stop)`` minimising ``d[row + k]`` (``(start, inf)`` when empty)."""
    if start >= stop:
        return start, np.inf
    arg, best = _row_argmin(d[row + start:row + stop])
    return start + arg, best


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _cluster_one(d: np.ndarray, ro: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray,
                 valid: np.ndarray) -> None:
    """Cluster one sample in place. The distance of pair ``i < j`` is ``d[ro[i] + j]`` (flat storage with a
    per-row offset, so the packed Gram blocks are used where they are); entries below the diagonal are
    never read. The entries hold cosine similarities on entry; each row is turned into distances just before its
    first scan, while the sample is in cache (saves a separate pass over the whole batch).

    Row ``i`` keeps the nearest neighbour among higher indices only (``nn[i] > i``), as in Müllner's
    generic algorithm, so repairs rescan half a row on average; merged-away columns are set to +inf. A row is
    marked stale instead of being rescanned at once: reducible linkages (single, complete, average) never bring
    a merged cluster closer than the nearer of its parts, so the old ``nnd`` stays a lower bound, and the row
    is rescanned only if it reaches the front. The merges are exactly the global-minimum merges with the
    lexicographic tie rule (see atc.cluster). ``valid``: the sample's padding mask (uint8, empty: none).
    """
    t = labels.shape[0]
    nn = np.empty(t, dtype=np.int64)
    nnd = np.empty(t, dtype=np.float64)
    masked = valid.shape[0] != 0
    for i in range(t):
        row = d[ro[i] + i + 1:ro[i] + t]
        best = _to_distances(row)
        if masked:
            best = _mask_row(row, valid, i)
        arg, nnd[i] = _first_index(row, best)
        nn[i] = i + 1 + arg
    stale = np.zeros(t, dtype=np.bool_)
    size = np.ones(t, dtype=np.float64)
    parent = np.arange(t)
    # Active clusters in increasing order (so every scan keeps the lowest-index-first tie rule).
    alive = np.arange(t)
    n_alive = t
    for _ in range(t - num_clusters):
        # The smallest bound wins if its row is up to date; otherwise that row is rescanned (its exact value
        # can only be larger) and the minimum taken again. The first row holding the minimum is taken, and
        # every row before it has a larger bound, so ties go to the lowest index. Merged-away rows hold +inf.
        while True:
            a, height = _row_argmin(nnd)
            if not stale[a]:
                break
            nn[a], nnd[a] = _tail_argmin(d, ro[a], a + 1, t)
            stale[a] = False
        b = nn[a]  # a < b
        n_a, n_b = size[a], size[b]
        idx = 0
        while alive[idx] < a:  # pairs (k, a) and (k, b) live in row k
            k = alive[idx]
            row_k = ro[k]
            v = _lance_williams(linkage, d[row_k + a], d[row_k + b], n_a, n_b)
            d[row_k + a] = v
            d[row_k + b] = np.inf
            nk = nn[k]
            if nk == a or nk == b:
                stale[k] = True
            elif (v < nnd[k] or (v == nnd[k] and a < nk)) and not stale[k]:
                nn[k] = a
                nnd[k] = v
            idx += 1
        row_a, row_b = ro[a], ro[b]
        idx += 1
        while alive[idx] < b:  # pair (a, k) in row a, pair (k, b) in row k
            k = alive[idx]
            d[row_a + k] = _lance_williams(linkage, d[row_a + k], d[ro[k] + b], n_a, n_b)
            d[ro[k] + b] = np.inf
            if nn[k] == b:
                stale[k] = True
            idx += 1
        # Both pairs in rows a and b; merged-away columns hold +inf there and every linkage maps (inf, inf)
        # to inf, so this loop runs over all columns without a branch (and vectorises).
        for k in range(b + 1, t):
            d[row_a + k] = _lance_williams(linkage, d[row_a + k], d[row_b + k], n_a, n_b)
        d[row_a + b] = np.inf
        n_alive -= 1
        for j in range(idx, n_alive):  # an explicit loop: slice assignment between overlapping views copies
            alive[j] = alive[j + 1]
        nnd[b] = np.inf
        stale[b] = False
        # Every remaining pair is at least the merge height, so it bounds the merged cluster's new row.
        stale[a] = True
        nnd[a] = height
        size[a] = n_a + n_b
        parent[b] = a
    # parent[x] < x, so one increasing pass resolves roots; clusters are numbered by their smallest token.
    next_id = 0
    for x in range(t):
        if parent[x] == x:
            labels[x] = next_id
            next_id += 1
        else:
            labels[x] = labels[parent[x]]


@njit(cache=True, inline="always", error_model="numpy")
def _row_offsets(bounds: np.ndarray, b: int, bsz: int, t: int) -> np.ndarray:
    """Where row ``i`` of sample ``b`` starts in the packed blocks, minus ``i``'s first column (see below)."""
    ro = np.empty(t, dtype=np.int64)
    offset = 0
    for r in range(bounds.shape[0]):
        s, e = bounds[r, 0], bounds[r, 1]
        width = t - s
        base = offset + b * (e - s) * width
        for i in range(s, e):
            ro[i] = base + (i - s) * width - s
        offset += bsz * (e - s) * width
    return ro


# One compiled loop per linkage: the linkage is a compile-time constant there (the kernel is inlined), so the
# Lance-Williams update has no per-element branch and the contiguous row update vectorises (~7% faster).
@njit(cache=True, parallel=True, error_model="numpy")
def _blocks_single(flat: np.ndarray, bounds: np.ndarray, num_clusters: int, labels: np.ndarray,
                  valid: np.ndarray) -> None:
    bsz, t = labels.shape
    for b in prange(bsz):
        _cluster_one(flat, _row_offsets(bounds, b, bsz, t), num_clusters, SINGLE, labels[b], valid[b])


@njit(cache=True, parallel=True, error_model="numpy")
def _blocks_complete(flat: np.ndarray, bounds: np.ndarray, num_clusters: int, labels: np.ndarray,
                    valid: np.ndarray) -> None:
    bsz, t = labels.shape
    for b in prange(bsz):
        _cluster_one(flat, _row_offsets(bounds, b, bsz, t), num_clusters, COMPLETE, labels[b], valid[b])


@njit(cache=True, parallel=True, error_model="numpy")
def _blocks_average(flat: np.ndarray, bounds: np.ndarray, num_clusters: int, labels: np.ndarray,
                   valid: np.ndarray) -> None:
    bsz, t = labels.shape
    for b in prange(bsz):
        _cluster_one(flat, _row_offsets(bounds, b, bsz, t), num_clusters, AVERAGE, labels[b], valid[b])


_BLOCKS = (_blocks_single, _blocks_complete, _blocks_average)  # indexed by SINGLE, COMPLETE, AVERAGE
#: The linkage ids compiled here (``atc.cluster.Linkage.numba_id``).
LINKAGE_IDS = (SINGLE, COMPLETE, AVERAGE)


def cluster_gram_blocks(flat: np.ndarray, bounds: np.ndarray, num_clusters: int, linkage: int,
                        labels: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Cluster every sample in place on its packed blocks (see ``atc.cluster._gram_blocks``): block ``r``
    covers rows ``bounds[r, 0] <= i < bounds[r, 1]`` against tokens ``k >= bounds[r, 0]``, stored as
    (B, rows, T - start). They hold cosine similarities, turned into the distances ``clamp(1 - g, 0, 2)`` of
    ``atc.cluster._fill_distances`` here, bit for bit. Only pairs above the diagonal are read. Writes ``labels``
    (B, T); parallel over the batch. ``linkage`` is one of :data:`LINKAGE_IDS`. ``valid``: ``(B, T)`` uint8 padding
    mask, or ``None``."""
    if linkage not in LINKAGE_IDS:  # a bad index (-1) must not run another linkage's loop
        raise ValueError(f"the numba backend has no compiled linkage with id {linkage!r}: it has {LINKAGE_IDS} "
                         f"(SINGLE, COMPLETE, AVERAGE)")
    if valid is None:
        valid = np.empty((labels.shape[0], 0), dtype=np.uint8)
    _BLOCKS[linkage](flat, bounds, num_clusters, labels, valid)
