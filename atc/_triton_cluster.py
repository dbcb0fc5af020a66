"""GPU backend: the whole merge loop of one sample inside one Triton program.

Input is the float64 cosine-similarity matrix every backend starts from (:func:`atc.cluster._gram_blocks`), one
``(T, T)`` square per sample of which only the upper triangle is read. The kernel turns it into the distances
``clamp(1 - g, 0, 2)`` of ``atc.cluster._fill_distances`` (bit for bit: the same float64 operations) in a
second buffer, then runs the nearest-neighbour Lance-Williams loop of :mod:`atc._numba_cluster` with the same
merge rule, tie-breaking, bookkeeping and float64 arithmetic, so both backends return identical labels, even on
exact ties.

Why one program per sample: a merge step is a handful of vector operations over the ``T`` clusters (the
front of the queue, two distance rows, the Lance-Williams update, the nearest-neighbour bookkeeping). Launched
as separate kernels they cost ~25 launches per step and the GPU idles; inside one program they cost a few
reductions and two row loads. The per-cluster state (nearest-neighbour bound, its index, staleness, size,
liveness, representative) lives in registers as ``(TP,)`` vectors, ``TP`` the next power of two of ``T``; the
distances live in global memory (L1/L2 resident at ViT sizes) as a full symmetric matrix, so the merged
cluster's row is one contiguous load.

Exactness notes: ``enable_fp_fusion=False`` keeps the average linkage's ``n_a*d_ak + n_b*d_bk`` from being
contracted into an FMA (which would round differently from numba and scipy); float64 division is IEEE
round-to-nearest on every GPU Triton targets. Non-finite inputs are detected on the device: the sample's labels
become ``min(t, K - 1)`` (a valid partition, never a hang) and ``flag[0]`` is set for the host to report
(see ``atc.cluster`` for when that happens).

Padding: with ``MASKED`` (a compile-time constant, so the unmasked kernel is unchanged) pass 1 writes +inf between
a real and a padding token and ``PADDING_DISTANCE`` between two padding tokens, as ``atc.cluster._mask_distances``;
the merge loop is the same.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SINGLE, COMPLETE, AVERAGE = 0, 1, 2
#: Distance between two padding tokens (``atc.cluster.PADDING_DISTANCE``): above every real distance.
PADDING_DISTANCE = 3.0
_PADDING_DISTANCE = tl.constexpr(PADDING_DISTANCE)  # what the kernel reads (Triton reads constexpr globals only)
#: The linkage ids the kernel has a ``LINKAGE`` branch for (``atc.cluster.Linkage.triton_id``).
LINKAGE_IDS = (SINGLE, COMPLETE, AVERAGE)

#: Largest token count the kernel accepts: its per-cluster vectors must fit the registers of one program
#: (above ~4096 they start to spill to local memory, still correct but slower).
MAX_TOKENS = 16384


@triton.jit
def _cluster_kernel(gram_ptr, dist_ptr, nnd_ptr, labels_ptr, flag_ptr, valid_ptr, B, T, num_clusters,
                    LINKAGE: tl.constexpr, S: tl.constexpr, TP: tl.constexpr, BR: tl.constexpr,
                    MASKED: tl.constexpr):
    # S samples per program (1 on a GPU; more under the interpreter, whose cost is per operation, not per
    # element), each a row of the (S, TP) per-cluster state.
    samples = tl.program_id(0) * S + tl.arange(0, S)
    row_base = samples.to(tl.int64)[:, None] * T  # (S, 1): each sample's labels and bounds rows
    base = samples.to(tl.int64) * T * T  # (S,): each sample's matrices
    base2 = base[:, None]
    idx = tl.arange(0, TP)[None, :]  # (1, TP)
    valid = (idx < T) & (samples < B)[:, None]  # (S, TP)
    inf = float("inf")

    # Pass 1, BR rows at a time: distances of the whole square from the upper triangle of the similarities
    # (so the matrix is exactly symmetric), +inf on the diagonal, and every row's nearest neighbour among
    # higher indices (the numba backend's convention: pair (i, j), i < j, belongs to row i).
    n_bad = tl.zeros([S], dtype=tl.int32)
    base3 = base[:, None, None]
    c3 = tl.arange(0, TP)[None, None, :]
    for r0 in range(0, T, BR):
        rows = r0 + tl.arange(0, BR)
        r3 = rows[None, :, None]
        inside = (r3 < T) & (c3 < T) & (samples < B)[:, None, None]  # (S, BR, TP)
        sim = tl.load(gram_ptr + base3 + tl.minimum(r3, c3) * T + tl.maximum(r3, c3), mask=inside, other=0.0)
        nan = sim != sim
        n_bad += tl.sum(tl.sum(nan.to(tl.int32), axis=2), axis=1)
        dist = tl.minimum(tl.maximum(1.0 - sim, 0.0), 2.0)
        if MASKED:  # valid_ptr: (B, T) uint8 padding mask
            vr = tl.load(valid_ptr + row_base[:, :, None] + r3, mask=inside, other=0) != 0
            vc = tl.load(valid_ptr + row_base[:, :, None] + c3, mask=inside, other=0) != 0
            dist = tl.where(vr & vc, dist, tl.where(vr | vc, inf, _PADDING_DISTANCE))
        dist = tl.where(nan | (r3 == c3), inf, dist)
        tl.store(dist_ptr + base3 + r3 * T + c3, dist, mask=inside)
        upper = tl.where(inside & (c3 > r3), dist, inf)
        row_min, row_arg = tl.min(upper, axis=2, return_indices=True, return_indices_tie_break_left=True)
        # An empty or all-+inf row points past itself, as in the numba backend.
        row_arg = tl.where(row_min == inf, rows[None, :] + 1, row_arg)
        at = row_base + rows[None, :]
        ok = (rows[None, :] < T) & (samples < B)[:, None]
        tl.store(nnd_ptr + at, row_min, mask=ok)
        tl.store(labels_ptr + at, row_arg.to(tl.int64), mask=ok)
    tl.debug_barrier()  # the state below is read back by other threads than wrote it

    lab = labels_ptr + row_base + idx  # (S, TP) pointers into each sample's labels
    nnd = tl.load(nnd_ptr + row_base + idx, mask=valid, other=inf)
    nn = tl.load(lab, mask=valid, other=0).to(tl.int32)
    stale = tl.zeros([S, TP], dtype=tl.int32)
    # Cluster sizes are small integers: exact in int32 and in float64. (1 in padding too: 0 * inf is NaN.)
    size = tl.full([S, TP], 1, tl.int32)
    alive = valid
    root = idx + tl.zeros([S, TP], dtype=tl.int32)
    for _ in range(0, T - num_clusters):
        # The smallest bound wins if its row is up to date; a stale row is rescanned (its exact value can only
        # be larger: single, complete and average linkage never bring a merged cluster closer than the nearer
        # of its parts) and the minimum taken again. Ties go to the lowest index, so the pair merged is the
        # lexicographically smallest among equally close pairs.
        height, a = tl.min(nnd, axis=1, return_indices=True, return_indices_tie_break_left=True)
        info = tl.sum(tl.where(idx == a[:, None], nn * 2 + stale, 0), axis=1)  # that row's neighbour, staleness
        while tl.max(info & 1, axis=0) != 0:
            front_stale = ((info & 1) != 0)[:, None]
            rescan = valid & alive & (idx > a[:, None]) & front_stale
            row = tl.load(dist_ptr + base2 + a[:, None] * T + idx, mask=rescan, other=inf)
            m, j = tl.min(tl.where(rescan, row, inf), axis=1, return_indices=True,
                          return_indices_tie_break_left=True)
            j = tl.where(m == inf, a + 1, j)
            at_a = (idx == a[:, None]) & front_stale
            nnd = tl.where(at_a, m[:, None], nnd)
            nn = tl.where(at_a, j[:, None], nn)
            stale = tl.where(at_a, 0, stale)
            height, a = tl.min(nnd, axis=1, return_indices=True, return_indices_tie_break_left=True)
            info = tl.sum(tl.where(idx == a[:, None], nn * 2 + stale, 0), axis=1)

        # Merge b into a (a < b): the Lance-Williams row of a ∪ b against every live cluster. (b is clamped
        # only for a sample with NaN, whose labels are replaced below: it must still read inside its matrix.)
        b = tl.minimum(info >> 1, T - 1)
        a2 = a[:, None]
        b2 = b[:, None]
        at_a = idx == a2
        at_b = idx == b2
        # Both sizes in one reduction (each is at most MAX_TOKENS < 2**15).
        sizes = tl.sum(tl.where(at_a, size, 0) + tl.where(at_b, size << 15, 0), axis=1)[:, None]
        n_a_int = sizes & 0x7FFF
        n_b_int = sizes >> 15
        n_a = n_a_int.to(tl.float64)
        n_b = n_b_int.to(tl.float64)
        row_a = tl.load(dist_ptr + base2 + a2 * T + idx, mask=valid, other=inf)
        row_b = tl.load(dist_ptr + base2 + b2 * T + idx, mask=valid, other=inf)
        if LINKAGE == 0:
            new = tl.minimum(row_a, row_b)
        elif LINKAGE == 1:
            new = tl.maximum(row_a, row_b)
        else:
            new = (n_a * row_a + n_b * row_b) / (n_a + n_b)
        alive = alive & ~at_b
        live = alive & ~at_a
        new = tl.where(live, new, inf)
        tl.store(dist_ptr + base2 + a2 * T + idx, new, mask=valid)
        tl.store(dist_ptr + base2 + idx * T + a2, new, mask=live)
        tl.debug_barrier()  # the column just written is read back by other threads in later row loads

        # Bookkeeping, as in the numba backend: rows k < a hold the pairs (k, a) and (k, b); rows a < k < b
        # hold (k, b); row a becomes stale with the merge height as its bound; row b dies.
        hit = (nn == a2) | (nn == b2)
        below = live & (idx < a2)
        closer = ((new < nnd) | ((new == nnd) & (a2 < nn))) & (stale == 0)
        take = below & ~hit & closer
        nn = tl.where(take, a2, nn)
        nnd = tl.where(take, new, nnd)
        lost = (below & hit) | (live & (idx > a2) & (idx < b2) & (nn == b2))
        stale = tl.where(lost | at_a, 1, tl.where(at_b, 0, stale))
        nnd = tl.where(at_a, height[:, None], tl.where(at_b, inf, nnd))
        size = tl.where(at_a, n_a_int + n_b_int, size)
        root = tl.where(root == b2, a2, root)

    # Clusters are numbered in order of their representative (smallest token): the rank of each token's root
    # among the representatives, gathered through the labels row.
    rank = tl.cumsum((valid & (root == idx)).to(tl.int32), axis=1) - 1
    tl.store(lab, rank.to(tl.int64), mask=valid)
    tl.debug_barrier()
    out = tl.load(labels_ptr + row_base + root, mask=valid, other=0)
    tl.debug_barrier()
    bad = (n_bad > 0)[:, None]
    out = tl.where(bad, tl.minimum(idx, num_clusters - 1).to(tl.int64), out)
    tl.store(lab, out, mask=valid)
    tl.store(flag_ptr + tl.zeros([S], dtype=tl.int32), tl.full([S], 1, tl.int32), mask=(n_bad > 0) & (samples < B))


def launch_config(t: int, bsz: int, interpreted: bool) -> tuple[int, int, int, int]:
    """``(S, TP, num_warps, BR)`` for ``bsz`` samples of ``t`` tokens: vectors of the next power of two of
    ``t``; under the interpreter up to 64 samples per program; on a GPU one sample per program, with two
    elements per thread in the per-cluster vectors up to 16 warps (a merge step is a chain of dependent
    reductions: more threads per sample shorten it, and four or more warps per SM hide its latencies) and 16 in
    pass 1's tiles. ``ATC_TRITON_NUM_WARPS`` overrides the warp count (``scripts/gpu_benchmark.sh`` sweeps it)."""
    tp = max(16, triton.next_power_of_2(t))
    if interpreted:
        return min(64, triton.next_power_of_2(bsz)), tp, 1, min(tp, 64)
    num_warps = int(os.environ.get("ATC_TRITON_NUM_WARPS", 0)) or max(1, min(16, tp // 64))
    br = max(1, min(tp, num_warps * 32 * 16 // tp))
    return 1, tp, num_warps, br


def cluster_gram(gram: torch.Tensor, num_clusters: int, linkage: int, flag: torch.Tensor,
                 samples_per_program: int | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster every sample of ``gram`` ``(B, T, T)`` float64 (cosine similarities; only the upper triangle,
    diagonal included, is read) into ``num_clusters`` clusters. Returns ``LongTensor (B, T)`` labels numbered
    by smallest token; sets ``flag[0] = 1`` (int32) if a sample held NaN. Never synchronises with the host.
    ``samples_per_program`` overrides the launch configuration's (a power of two; for tests). ``valid``: optional
    ``(B, T)`` bool padding mask (see the module docstring)."""
    bsz, t, _ = gram.shape
    assert t <= MAX_TOKENS, "checked by atc.cluster"
    if linkage not in LINKAGE_IDS:  # the kernel's last branch would otherwise run average linkage
        raise ValueError(f"the triton kernel has no linkage with id {linkage!r}: it has {LINKAGE_IDS} "
                         f"(SINGLE, COMPLETE, AVERAGE)")
    dist = torch.empty_like(gram)
    nnd = torch.empty(bsz, t, dtype=torch.float64, device=gram.device)
    labels = torch.empty(bsz, t, dtype=torch.long, device=gram.device)
    spp, tp, num_warps, br = launch_config(t, bsz, os.environ.get("TRITON_INTERPRET") == "1")
    spp = samples_per_program or spp
    mask = labels if valid is None else valid.to(torch.uint8).contiguous()  # never read when unmasked
    _cluster_kernel[(triton.cdiv(bsz, spp),)](
        gram, dist, nnd, labels, flag, mask, bsz, t, num_clusters, LINKAGE=linkage, S=spp, TP=tp, BR=br,
        MASKED=valid is not None, num_warps=num_warps, num_stages=1, enable_fp_fusion=False)
    return labels
