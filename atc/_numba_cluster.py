"""Compiled CPU backend: nearest-neighbour-list Lance-Williams clustering, parallel over the batch.

Input is the float64 cosine-similarity matrix that every backend starts from (:func:`atc.cluster._gram_blocks`). The merge rule, tie-breaking and float64 arithmetic are the same as the torch backend in
:mod:`atc.cluster`, so both return identical labels, even on exact ties.

Per sample the cost is O(T^2) to build distances and initial nearest neighbours, then O(T) per merge plus half
a row for each stale row that reaches the front of the queue.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

SINGLE, COMPLETE, AVERAGE = 0, 1, 2


@njit(cache=True, inline="always", error_model="numpy")
def _lance_williams(linkage: int, d_ak: float, d_bk: float, n_a: float, n_b: float) -> float:
    if linkage == SINGLE:
        return min(d_ak, d_bk)
    if linkage == COMPLETE:
        return max(d_ak, d_bk)
    return (n_a * d_ak + n_b * d_bk) / (n_a + n_b)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _row_argmin(row: np.ndarray) -> tuple[int, float]:
    """First index of the minimum (merged-away clusters and the diagonal hold +inf, so they never win).

    Four interleaved running minima shorten the compare-and-update dependency chain; combining them by
    (value, index) keeps the first-occurrence rule.
    """
    n = row.shape[0]
    b0 = b1 = b2 = b3 = np.inf
    a0 = a1 = a2 = a3 = 0
    k = 0
    while k + 4 <= n:
        v = row[k]
        if v < b0:
            b0, a0 = v, k
        v = row[k + 1]
        if v < b1:
            b1, a1 = v, k + 1
        v = row[k + 2]
        if v < b2:
            b2, a2 = v, k + 2
        v = row[k + 3]
        if v < b3:
            b3, a3 = v, k + 3
        k += 4
    while k < n:
        v = row[k]
        if v < b0:
            b0, a0 = v, k
        k += 1
    best, arg = b0, a0
    if b1 < best or (b1 == best and a1 < arg):
        best, arg = b1, a1
    if b2 < best or (b2 == best and a2 < arg):
        best, arg = b2, a2
    if b3 < best or (b3 == best and a3 < arg):
        best, arg = b3, a3
    if best == np.inf:
        return 0, best
    return arg, best


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _tail_argmin(row: np.ndarray, start: int) -> tuple[int, float]:
    """First index of the minimum of ``row[start:]`` (``(start, inf)`` when empty or all +inf)."""
    if start >= row.shape[0]:
        return start, np.inf
    arg, best = _row_argmin(row[start:])
    return start + arg, best


@njit(cache=True, nogil=True, error_model="numpy")
def _cluster_one(d: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray) -> None:
    """Cluster one sample in place. ``d`` (T, T): distances in the strict upper triangle (pair ``i < j`` at
    ``d[i, j]``); the lower triangle is never read.

    Row ``i`` keeps the nearest neighbour among higher indices only (``nn[i] > i``), as in Müllner's
    generic algorithm, so repairs rescan half a row on average; merged-away columns are set to +inf. A row is
    marked stale instead of being rescanned at once: reducible linkages (single, complete, average) never bring
    a merged cluster closer than the nearer of its parts, so the old ``nnd`` stays a lower bound, and the row
    is rescanned only if it reaches the front. The merges are exactly the global-minimum merges with the
    lexicographic tie rule (see atc.cluster).
    """
    t = d.shape[0]
    nn = np.empty(t, dtype=np.int64)
    nnd = np.empty(t, dtype=np.float64)
    for i in range(t):
        nn[i], nnd[i] = _tail_argmin(d[i], i + 1)
    stale = np.zeros(t, dtype=np.bool_)
    size = np.ones(t, dtype=np.float64)
    parent = np.arange(t)
    for _ in range(t - num_clusters):
        # One pass: a stale row is rescanned only if its lower bound beats the best exact value so far
        # (rows after the winner with an equal value lose the tie, so bounds >= the best can be skipped).
        height = np.inf
        a = 0
        for r in range(t):
            if nnd[r] < height:
                if stale[r]:
                    nn[r], nnd[r] = _tail_argmin(d[r], r + 1)
                    stale[r] = False
                    if nnd[r] < height:
                        height = nnd[r]
                        a = r
                else:
                    height = nnd[r]
                    a = r
        b = nn[a]  # a < b
        n_a, n_b = size[a], size[b]
        # Rows of merged-away clusters are all +inf, and every linkage maps (inf, inf) to inf, so these loops
        # need no branch on whether k is still active (an unpredictable branch costs more than the work).
        for k in range(a):  # pairs (k, a) and (k, b) live in row k
            v = _lance_williams(linkage, d[k, a], d[k, b], n_a, n_b)
            d[k, a] = v
            d[k, b] = np.inf
            nk = nn[k]
            if nk == a or nk == b:
                stale[k] = True
            elif (v < nnd[k] or (v == nnd[k] and a < nk)) and not stale[k]:
                nn[k] = a
                nnd[k] = v
        row_a, row_b = d[a], d[b]
        for k in range(a + 1, b):  # pair (a, k) in row a, pair (k, b) in row k
            row_a[k] = _lance_williams(linkage, row_a[k], d[k, b], n_a, n_b)
            d[k, b] = np.inf
            if nn[k] == b:
                stale[k] = True
        for k in range(b + 1, t):  # both pairs in rows a and b
            row_a[k] = _lance_williams(linkage, row_a[k], row_b[k], n_a, n_b)
            row_b[k] = np.inf
        row_a[b] = np.inf
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


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _distance(g: float) -> float:
    # Same expression and clamping as atc.cluster._fill_distances.
    v = 1.0 - g
    return 0.0 if v < 0.0 else (2.0 if v > 2.0 else v)


@njit(cache=True, nogil=True, error_model="numpy")
def _cluster_sample(flat: np.ndarray, bounds: np.ndarray, bsz: int, b: int, d: np.ndarray, num_clusters: int,
                    linkage: int, labels: np.ndarray) -> None:
    """Sample ``b`` of the packed Gram blocks: fill the upper triangle of ``d`` with distances, cluster."""
    t = d.shape[0]
    offset = 0
    for r in range(bounds.shape[0]):
        s, e = bounds[r, 0], bounds[r, 1]
        width = t - s
        base = offset + b * (e - s) * width
        for i in range(s, e):
            row = base + (i - s) * width - s
            for k in range(i + 1, t):
                d[i, k] = _distance(flat[row + k])
        offset += bsz * (e - s) * width
    _cluster_one(d, num_clusters, linkage, labels)


@njit(cache=True, parallel=True, error_model="numpy")
def cluster_gram_blocks(flat: np.ndarray, bounds: np.ndarray, num_clusters: int, linkage: int,
                        labels: np.ndarray, workers: int) -> None:
    """Cluster every sample from its packed cosine-similarity blocks (see ``atc.cluster._gram_blocks``):
    block ``r`` covers rows ``bounds[r, 0] <= i < bounds[r, 1]`` against tokens ``k >= bounds[r, 0]`` and is
    stored as (B, rows, T - start). Only the upper triangle is read. Writes ``labels`` (B, T).

    ``workers`` (the thread count) tasks each take every ``workers``-th sample and reuse one working matrix.
    """
    bsz, t = labels.shape
    workers = max(1, min(workers, bsz))
    for w in prange(workers):
        d = np.empty((t, t))
        for b in range(w, bsz, workers):
            _cluster_sample(flat, bounds, bsz, b, d, num_clusters, linkage, labels[b])
