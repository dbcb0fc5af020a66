"""Compiled CPU backend: nearest-neighbour-list Lance-Williams clustering, parallel over the batch.

Input is the float64 cosine-similarity matrix that every backend starts from (:func:`atc.cluster._gram`, upper
triangle). The merge rule, tie-breaking and float64 arithmetic are the same as the torch backend in
:mod:`atc.cluster`, so both return identical labels, even on exact ties.

Per sample the cost is O(T^2) to build distances and initial nearest neighbours, then O(T) per merge plus O(T)
for each stale row that reaches the front of the queue.
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
def _cluster_gram_one(d: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray) -> None:
    """Cluster one sample. ``d`` (T, T): cosine similarities, of which only the upper triangle is read; it is
    overwritten with the (symmetric) distances ``clamp(1 - g, 0, 2)`` and used as the working matrix."""
    t = d.shape[0]
    nn = np.empty(t, dtype=np.int64)
    nnd = np.empty(t, dtype=np.float64)
    for i in range(t):
        row = d[i]
        for k in range(i + 1, t):
            v = 1.0 - row[k]
            v = 0.0 if v < 0.0 else (2.0 if v > 2.0 else v)
            row[k] = v
            d[k, i] = v
        row[i] = np.inf
    for i in range(t):
        nn[i], nnd[i] = _row_argmin(d[i])
    active = np.ones(t, dtype=np.bool_)
    # stale[k]: row k's nearest neighbour is unknown and nnd[k] is only a lower bound of its true value.
    # Reducible linkages (single, complete, average) never bring a cluster closer to k than the nearer of
    # the two clusters merged, so the old nnd[k] stays a valid lower bound; a stale row is recomputed only
    # when it reaches the front, which gives the same merges as recomputing it at once.
    stale = np.zeros(t, dtype=np.bool_)
    size = np.ones(t, dtype=np.float64)
    parent = np.arange(t)
    merged = np.empty(t, dtype=np.float64)
    for _ in range(t - num_clusters):
        # Smallest distance; ties -> smallest row, and nn[row] is the smallest column at that distance.
        while True:
            i = _row_argmin(nnd)[0]
            if not stale[i]:
                break
            nn[i], nnd[i] = _row_argmin(d[i])
            stale[i] = False
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
        stale[b] = False
        stale[a] = True  # nnd[a] (the merge height) bounds the merged cluster's new nearest distance
        size[a] = n_a + n_b
        parent[b] = a
        for k in range(t):
            if not active[k] or stale[k]:
                continue
            if nn[k] == a or nn[k] == b:
                stale[k] = True
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


@njit(cache=True, parallel=True)
def cluster_gram_batch(g: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray) -> None:
    """Cluster every sample given its cosine-similarity matrix ``g`` (B, T, T) (overwritten); ``labels`` (B, T)."""
    for b in prange(g.shape[0]):
        _cluster_gram_one(g[b], num_clusters, linkage, labels[b])
