"""Compiled CPU backend: nearest-neighbour-list Lance-Williams clustering, parallel over the batch.

Same merge rule, tie-breaking and float64 arithmetic as the torch backend in :mod:`atc.cluster`, so both give
identical labels. Per sample the cost is O(T^2) to find initial nearest neighbours plus O(T) per merge (and
O(T) for each row whose nearest neighbour was one of the merged clusters).
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


@njit(cache=True, nogil=True)
def _row_argmin(row: np.ndarray, active: np.ndarray) -> tuple[int, float]:
    best = np.inf
    arg = 0
    for k in range(row.shape[0]):
        if active[k] and row[k] < best:
            best = row[k]
            arg = k
    return arg, best


@njit(cache=True, nogil=True)
def cluster_one(d: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray) -> None:
    """Cluster one sample in place. ``d``: (T, T) float64 distances with +inf on the diagonal (overwritten)."""
    t = d.shape[0]
    active = np.ones(t, dtype=np.bool_)
    size = np.ones(t, dtype=np.float64)
    parent = np.arange(t)
    nn = np.empty(t, dtype=np.int64)
    nnd = np.empty(t, dtype=np.float64)
    for i in range(t):
        nn[i], nnd[i] = _row_argmin(d[i], active)
    for _ in range(t - num_clusters):
        # Smallest distance; ties -> smallest row, and nn[row] is the smallest column at that distance.
        best = np.inf
        i = 0
        for r in range(t):
            if active[r] and nnd[r] < best:
                best = nnd[r]
                i = r
        j = nn[i]
        a, b = (i, j) if i < j else (j, i)
        n_a, n_b = size[a], size[b]
        active[b] = False
        for k in range(t):
            if active[k] and k != a:
                v = _lance_williams(linkage, d[a, k], d[b, k], n_a, n_b)
                d[a, k] = v
                d[k, a] = v
        size[a] = n_a + n_b
        parent[b] = a
        for k in range(t):
            if not active[k]:
                continue
            if k == a or nn[k] == a or nn[k] == b:
                nn[k], nnd[k] = _row_argmin(d[k], active)
            else:
                v = d[k, a]
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
def cluster_batch(d: np.ndarray, num_clusters: int, linkage: int, labels: np.ndarray) -> None:
    """Cluster every sample of ``d`` (B, T, T) in parallel; writes ``labels`` (B, T)."""
    for b in prange(d.shape[0]):
        cluster_one(d[b], num_clusters, linkage, labels[b])
