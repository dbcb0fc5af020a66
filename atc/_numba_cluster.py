"""Compiled CPU backend: nearest-neighbour-list Lance-Williams clustering, parallel over the batch.

Input is the float64 cosine-similarity matrix that every backend starts from (:func:`atc.cluster._gram_blocks`). The merge rule, tie-breaking and float64 arithmetic are the same as the torch backend in
:mod:`atc.cluster`, so both return identical labels, even on exact ties.

Per sample the cost is O(T^2) to build distances and initial nearest neighbours, then O(T) per merge plus O(T)
for each row whose nearest neighbour was one of the two merged clusters (about two per merge).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

SINGLE, COMPLETE, AVERAGE = 0, 1, 2


@njit(cache=True, inline="always")
def _lance_williams(linkage: int, d_ak: float, d_bk: float, n_a: float, n_b: float) -> float:
    if linkage == SINGLE:
        return min(d_ak, d_bk)
    if linkage == COMPLETE:
        return max(d_ak, d_bk)
    return (n_a * d_ak + n_b * d_bk) / (n_a + n_b)


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True)
def _cluster_one(d: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray) -> None:
    """Cluster one sample. ``d`` (T, T): distances with +inf on the diagonal, used as the working matrix."""
    t = d.shape[0]
    nn = np.empty(t, dtype=np.int64)
    nnd = np.empty(t, dtype=np.float64)
    for i in range(t):
        nn[i], nnd[i] = _row_argmin(d[i])
    active = np.ones(t, dtype=np.bool_)
    size = np.ones(t, dtype=np.float64)
    parent = np.arange(t)
    merged = np.empty(t, dtype=np.float64)
    for _ in range(t - num_clusters):
        # Smallest distance; ties -> smallest row, and nn[row] is the smallest column at that distance.
        i = _row_argmin(nnd)[0]
        j = nn[i]
        a, b = (i, j) if i < j else (j, i)
        n_a, n_b = size[a], size[b]
        row_a, row_b = d[a], d[b]
        # Merged-away columns hold +inf in both rows, and every linkage maps (inf, inf) to inf. The update
        # goes through a separate buffer so this loop vectorises; the column writes follow.
        for k in range(t):
            merged[k] = _lance_williams(linkage, row_a[k], row_b[k], n_a, n_b)
        merged[a] = np.inf
        merged[b] = np.inf
        for k in range(t):
            v = merged[k]
            row_a[k] = v
            d[k, a] = v
            row_b[k] = np.inf
            d[k, b] = np.inf
        active[b] = False
        nnd[b] = np.inf
        size[a] = n_a + n_b
        parent[b] = a
        for k in range(t):
            if not active[k]:
                continue
            if k == a or nn[k] == a or nn[k] == b:
                nn[k], nnd[k] = _row_argmin(d[k])
            else:
                v = merged[k]
                if v < nnd[k] or (v == nnd[k] and a < nn[k]):
                    nn[k] = a
                    nnd[k] = v
    # parent[x] < x, so one increasing pass resolves roots; clusters are numbered by their smallest token.
    next_id = 0
    for x in range(t):
        if parent[x] == x:
            labels[x] = next_id
            next_id += 1
        else:
            labels[x] = labels[parent[x]]


@njit(cache=True, nogil=True, inline="always")
def _distance(g: float) -> float:
    # Same expression and clamping as atc.cluster._distance_matrix.
    v = 1.0 - g
    return 0.0 if v < 0.0 else (2.0 if v > 2.0 else v)


@njit(cache=True, parallel=True)
def cluster_gram_blocks(top: np.ndarray, bottom: np.ndarray, num_clusters: int, linkage: int,
                        labels: np.ndarray) -> None:
    """Cluster every sample from its cosine similarities given as two blocks (see ``atc.cluster._gram_blocks``):
    ``top`` (B, h, T) = rows ``[0, h)`` against all tokens, ``bottom`` (B, T-h, T-h) = rows and columns
    ``[h, T)``. The lower-left block is the transpose of ``top[:, :, h:]``. Writes ``labels`` (B, T)."""
    bsz, h, t = top.shape
    for b in prange(bsz):
        d = np.empty((t, t))
        tb, bb = top[b], bottom[b]
        for i in range(h):
            for k in range(t):
                d[i, k] = _distance(tb[i, k])
        for i in range(h, t):
            for k in range(h):
                d[i, k] = d[k, i]
            for k in range(h, t):
                d[i, k] = _distance(bb[i - h, k - h])
        for i in range(t):
            d[i, i] = np.inf
        _cluster_one(d, num_clusters, linkage, labels[b])
