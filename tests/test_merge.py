"""atc.merge against brute-force references (explicit loops over clusters and tokens)."""

from __future__ import annotations

import math

import pytest
import torch

from atc import merge as M
from atc.cluster import agglomerative_clustering


def brute_force_merge(x, size, labels, num_out):
    """Loop over slots: size-weighted mean and summed size of each slot's tokens."""
    b, t, c = x.shape
    out = torch.zeros(b, num_out, c, dtype=x.dtype)
    out_size = torch.zeros(b, num_out, 1, dtype=x.dtype)
    for i in range(b):
        for k in range(num_out):
            members = [j for j in range(t) if labels[i, j] == k]
            assert members, "every slot must hold at least one token"
            w = torch.stack([size[i, j] for j in members])
            out[i, k] = sum(x[i, j] * size[i, j] for j in members) / w.sum()
            out_size[i, k] = w.sum()
    return out, out_size


def check_partition(merge: M.Merge, protected: int, removed: int, spatial: bool = True):
    labels = merge.labels
    b, t = labels.shape
    assert merge.num_out == t - removed
    for row in labels.tolist():
        assert row[:protected] == list(range(protected)), "protected tokens keep their own first slots"
        assert set(row[protected:]).isdisjoint(range(protected)), "nothing merges into a protected token"
        assert sorted(set(row)) == list(range(merge.num_out)), "every slot is used"
        if spatial:
            assert list(dict.fromkeys(row)) == list(range(merge.num_out)), "slots numbered by smallest token"


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("layout", M.LAYOUTS)
def test_every_method_removes_exactly_r(method, protected, layout):
    gen = torch.Generator().manual_seed(protected)
    x = torch.randn(3, 21, 8, generator=gen)
    for r in (0, 1, 5, M.max_removable(method, 21, protected)):
        merge = M.merge_by_method(method, x, r, protected, linkage="complete", layout=layout)
        check_partition(merge, protected, r, spatial=layout == "spatial" or method == "atc" or r == 0)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        M.bipartite_soft_matching(torch.randn(1, 9, 4), 2, 1, layout="zigzag")


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
def test_too_many_removed_is_an_error(method):
    x = torch.randn(1, 11, 4)
    limit = M.max_removable(method, 11, 1)
    with pytest.raises(ValueError, match="can remove between 0 and"):
        M.merge_by_method(method, x, limit + 1, 1)
    with pytest.raises(ValueError):
        M.merge_by_method(method, x, -1, 1)
    with pytest.raises(TypeError):
        M.merge_by_method(method, x, 1.5, 1)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown merge method"):
        M.merge_by_method("bogus", torch.randn(1, 4, 2), 1)
    with pytest.raises(ValueError, match="unknown merge method"):
        M.max_removable("bogus", 10)


def test_max_removable():
    assert M.max_removable("tome", 197, 1) == 98
    assert M.max_removable("tome", 198, 2) == 98
    assert M.max_removable("atc", 197, 1) == 195


@pytest.mark.parametrize("seed", range(5))
def test_merge_wavg_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    b, t, c, k = 2, 15, 6, 6
    x = torch.randn(b, t, c, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (b, t, 1), generator=gen).double()
    labels = torch.stack([torch.randperm(t, generator=gen) % k for _ in range(b)])
    merge = M.Merge(labels, k)
    got_x, got_size = merge.merge_wavg(x, size)
    ref_x, ref_size = brute_force_merge(x, size, labels, k)
    assert torch.allclose(got_x, ref_x, atol=1e-12)
    assert torch.equal(got_size, ref_size)
    # Plain (unweighted) mean is the weighted mean with unit weights.
    ref_mean, _ = brute_force_merge(x, torch.ones_like(size), labels, k)
    assert torch.allclose(merge.merge(x), ref_mean, atol=1e-12)


def test_unmerge_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randperm(12, generator=gen) % 5 for _ in range(3)])
    merge = M.Merge(labels, 5)
    y = torch.randn(3, 5, 4, generator=gen)
    out = merge.unmerge(y)
    for i in range(3):
        for j in range(12):
            assert torch.equal(out[i, j], y[i, labels[i, j]])


def test_atc_merge_uses_clustering_of_unprotected_tokens():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 30, 8, generator=gen)
    for linkage in ("single", "complete", "average"):
        merge = M.atc_merge(x, 10, protected_tokens=1, linkage=linkage)
        ref = agglomerative_clustering(x[:, 1:], 19, linkage)
        assert torch.equal(merge.labels[:, 1:] - 1, ref)
        assert torch.equal(merge.labels[:, 0], torch.zeros(4, dtype=torch.long))


def tome_reference(x, r, protected):
    """Bipartite soft matching written as in ToMe's paper, one sample at a time with explicit loops.

    Returns, for every token, the merged (plain mean) vector it ends up in."""
    b, t, c = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        unit = [x[i, j] / x[i, j].norm() for j in range(t)]
        src = [j for j in range(t) if j % 2 == 0 and j >= protected]
        dst = [j for j in range(t) if j % 2 == 1 and j >= protected]
        best = []
        for s in src:
            scores = [float(unit[s] @ unit[d]) for d in dst]
            m = max(scores)
            best.append((m, s, dst[scores.index(m)]))
        best.sort(key=lambda e: -e[0])  # stable: equal scores keep source order
        groups = {j: [j] for j in range(t)}
        for _, s, d in best[:r]:
            groups[d].append(s)
            del groups[s]
        for members in groups.values():
            mean = torch.stack([x[i, j] for j in members]).mean(0)
            for j in members:
                out[i, j] = mean
    return out


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_tome_matches_reference(protected, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 17, 5, generator=gen, dtype=torch.float64)
    for r in (1, 4, (17 - protected) // 2):
        for layout in M.LAYOUTS:
            merge = M.bipartite_soft_matching(x, r, protected, layout=layout)
            check_partition(merge, protected, r, spatial=layout == "spatial")
            assert torch.allclose(merge.unmerge(merge.merge(x)), tome_reference(x, r, protected), atol=1e-12)


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_tome_published_layout(protected):
    """[protected, unmerged sources (by index with a class token, else by descending best score), destinations
    in index order] -- ToMe's layout, written out with loops."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 19, 5, generator=gen, dtype=torch.float64)
    r = 4
    merge = M.bipartite_soft_matching(x, r, protected)
    for i in range(2):
        unit = [x[i, j] / x[i, j].norm() for j in range(19)]
        src = [j for j in range(19) if j % 2 == 0 and j >= protected]
        dst = [j for j in range(19) if j % 2 == 1 and j >= protected]
        best = {s: max(float(unit[s] @ unit[d]) for d in dst) for s in src}
        ranked = sorted(src, key=lambda s: -best[s])
        unmerged = ranked[r:] if protected == 0 else sorted(ranked[r:])
        expected = list(range(protected)) + unmerged + dst
        for slot, token in enumerate(expected):
            assert int(merge.labels[i, token]) == slot


def test_tome_custom_destination_mask():
    x = torch.randn(2, 12, 4)
    dst = torch.zeros(12, dtype=torch.bool)
    dst[[0, 5, 11]] = True
    merge = M.bipartite_soft_matching(x, 9, 0, dst_mask=dst)
    assert merge.num_out == 3
    # Each destination keeps its own slot, and every other token joined one of them.
    for row in merge.labels:
        assert len({int(row[i]) for i in (0, 5, 11)}) == 3


def test_source_tracking_composes_merges():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 20, 6, generator=gen)
    token_map = M.init_token_map(2, 20)
    size = torch.ones(2, 20, 1)
    total = None
    for r, method in ((5, "atc"), (4, "tome"), (3, "atc")):
        merge = M.merge_by_method(method, x, r, 1)
        x, size = merge.merge_wavg(x, size)
        token_map = merge.merge_token_map(token_map)
        total = merge if total is None else total.then(merge)
    # Brute force: the slot that holds original token n has size = number of originals mapped there.
    for i in range(2):
        for slot in range(x.shape[1]):
            assert int(size[i, slot, 0]) == int((token_map[i] == slot).sum())
    assert torch.equal(total.labels, token_map)
    src = M.source_matrix(token_map, x.shape[1])
    assert src.shape == (2, x.shape[1], 20)
    assert torch.equal(src.sum(1), torch.ones(2, 20))
    assert torch.equal(src.sum(2, keepdim=True), size)


def test_proportional_attention_bias():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = M.proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    assert torch.allclose(bias.flatten(), torch.tensor([0.0, math.log(2), math.log(4)]))


def kmedoids_reference(x, k, weights, iters):
    """The published K-Medoids with explicit loops: init = top-k by weight (in that order); assign to the
    nearest medoid (first on ties); medoid of cluster c = the member i with the smallest w_i * sum_j d(i, j)
    over all tokens j (token 0 for an empty cluster). Returns the medoids in cluster order."""
    n = x.shape[0]
    dist = torch.cdist(x, x)
    medoids = sorted(range(n), key=lambda j: -float(weights[j]))[:k]
    cost = [float(weights[j]) * float(dist[j].sum()) for j in range(n)]
    for _ in range(iters):
        assign = [min(range(k), key=lambda m: (float(dist[j, medoids[m]]), m)) for j in range(n)]
        for m in range(k):
            members = [j for j in range(n) if assign[j] == m]
            medoids[m] = min(members, key=lambda j: cost[j]) if members else 0
    return medoids


@pytest.mark.parametrize("layout", M.LAYOUTS)
def test_kmedoids_outputs_are_the_medoids(layout):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 25, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, 25, generator=gen)
    merge = M.kmedoids(x, 9, protected_tokens=1, weights=weights, iters=3, layout=layout)
    out = merge.merge(x)
    assert out.shape == (2, 16, 5)
    for i in range(2):
        ref = kmedoids_reference(x[i, 1:], 15, weights[i, 1:], 3)
        chosen = [int(s) - 1 for s in merge.select[i, 1:]]
        assert chosen == ref if layout == "published" else sorted(chosen) == sorted(ref)
        assert torch.equal(out[i, 0], x[i, 0])
        for slot in range(16):
            # Every output token is an input token that belongs to its own slot.
            assert merge.labels[i, merge.select[i, slot]] == slot
            assert torch.equal(out[i, slot], x[i, merge.select[i, slot]])


def test_kmedoids_without_weights_starts_farthest_point_from_token_0():
    x = torch.tensor([[[0.0], [1.0], [10.0], [4.0], [9.0]]])
    merge = M.kmedoids(x, 2, protected_tokens=0, iters=0)
    # token 0, then the farthest from it (10), then the token whose *largest* distance to the chosen ones is
    # largest, as published (1 and 9 both have 9: the first, 1)
    assert merge.select[0].tolist() == [0, 2, 1]


def dpc_knn_reference(x, k_clusters, k_nn):
    n, c = x.shape
    dist = torch.cdist(x, x) / math.sqrt(c)
    density = []
    for i in range(n):
        nearest = sorted(float(v) for v in dist[i])[:k_nn]
        density.append(math.exp(-sum(v * v for v in nearest) / k_nn))
    density = [d + 1e-6 * (n - 1 - i) / n for i, d in enumerate(density)]
    dmax = float(dist.max())
    score = []
    for i in range(n):
        denser = [float(dist[i, j]) for j in range(n) if density[j] > density[i]]
        score.append((min(denser) if denser else dmax) * density[i])
    centres = sorted(range(n), key=lambda i: -score[i])[:k_clusters]
    assign = []
    for j in range(n):
        if j in centres:
            assign.append(centres.index(j))
        else:
            assign.append(min(range(k_clusters), key=lambda m: (float(dist[centres[m], j]), m)))
    return assign


def test_dpc_knn_matches_reference():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 6, generator=gen, dtype=torch.float64)
    merge = M.dpc_knn(x, 12, protected_tokens=1, k=5)
    spatial = M.dpc_knn(x, 12, protected_tokens=1, k=5, layout="spatial")
    for i in range(2):
        ref = dpc_knn_reference(x[i, 1:], 17, 5)
        assert merge.labels[i, 1:].tolist() == [a + 1 for a in ref]  # published: slot k = k-th centre by score
        mapping: dict[int, int] = {}
        ref_canon = [mapping.setdefault(a, len(mapping)) + 1 for a in ref]
        assert spatial.labels[i, 1:].tolist() == ref_canon
    # Learnable-weight merge: sum(w x) / (sum(w) + 1e-6) per cluster, sizes ignored but summed.
    w = torch.rand(2, 30, 1, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 30, 1), generator=gen).double()
    merged, merged_size = merge.merge_with_size(x, size, w)
    for i in range(2):
        for slot in range(merge.num_out):
            members = [j for j in range(30) if merge.labels[i, j] == slot]
            ref_x = sum(w[i, j] * x[i, j] for j in members) / (sum(w[i, j] for j in members) + 1e-6)
            assert torch.allclose(merged[i, slot], ref_x, atol=1e-12)
            assert float(merged_size[i, slot]) == sum(float(size[i, j]) for j in members)


def test_identity_when_nothing_removed():
    x = torch.randn(2, 9, 3)
    for method in M.MERGE_METHODS:
        merge = M.merge_by_method(method, x, 0, 1)
        assert torch.equal(merge.merge(x), x)
        assert torch.equal(merge.unmerge(x), x)


def test_merges_are_differentiable():
    x = torch.randn(2, 12, 4, requires_grad=True)
    merge = M.atc_merge(x, 5, 1)
    y, _ = merge.merge_wavg(x, torch.ones(2, 12, 1))
    merge.unmerge(y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ padding
def _padded(gen, lengths, t, c, p):
    """Metric and mask of a padded batch: sample i has lengths[i] real tokens (protected ones included) first."""
    x = torch.randn(len(lengths), t, c, generator=gen, dtype=torch.float64)
    valid = torch.arange(t).expand(len(lengths), t) < torch.tensor(lengths).unsqueeze(1)
    return x, valid


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_padding_each_sample_merges_as_alone(method, protected):
    """A padded batch against each sample run alone (no padding) with what that method removes from it alone:
    identical slots for the real tokens, in both layouts; padding only with padding (the first ones folded into
    one slot when the sample gave up fewer than r), sizes of padding 0, no NaN, the mask of the output slots."""
    gen = torch.Generator().manual_seed(31 + protected)
    t = 23
    lengths = [t, protected + 1, protected + 2, 12, t - 1]
    x, valid = _padded(gen, lengths, t, 6, protected)
    weights = torch.rand(len(lengths), t, generator=gen)
    for layout in M.LAYOUTS:
        for r in sorted({1, 4, 9, M.max_removable(method, t, protected, masked=True)}):
            merge = M.merge_by_method(method, x, r, protected, layout=layout, valid=valid, linkage="complete",
                                      weights=weights if method == "kmedoids" else None)
            assert merge.num_out == t - r
            size = valid.double().unsqueeze(-1)
            merged, merged_size = merge.merge_with_size(x, size)
            assert torch.isfinite(merged).all()
            for i, n in enumerate(lengths):
                own_r = min(r, M.max_removable(method, n, protected))
                alone = M.merge_by_method(method, x[i:i + 1, :n], own_r, protected, layout=layout,
                                          linkage="complete", weights=weights[i:i + 1, :n] if method == "kmedoids"
                                          else None)
                k = alone.num_out
                assert merge.labels[i, :n].tolist() == alone.labels[0].tolist(), (layout, r, n)
                if merge.select is not None and alone.select is not None:
                    assert merge.select[i, :k].tolist() == alone.select[0].tolist()
                pad = merge.labels[i, n:].tolist()
                surplus = r - own_r
                assert pad == [k + max(0, j - surplus) for j in range(t - n)], (layout, r, n, pad)
                assert merge.valid[i].tolist() == [j < k for j in range(t - r)]
                ref_x, ref_size = brute_force_merge(x[i:i + 1, :n], size[i:i + 1, :n], alone.labels, k)
                if alone.select is None and method != "dpcknn":
                    torch.testing.assert_close(merged[i, :k], ref_x[0], rtol=0, atol=1e-12)
                assert torch.equal(merged_size[i, :k], ref_size[0])
                assert merged_size[i, k:].eq(0).all()


def test_padding_tome_matches_brute_force_reference():
    """Independently of the unpadded code: ToMe's brute-force loop on each sample's real tokens."""
    gen = torch.Generator().manual_seed(8)
    lengths = [17, 9, 4]
    x, valid = _padded(gen, lengths, 17, 5, 1)
    for r in (1, 2, 3):
        merge = M.bipartite_soft_matching(x, r, 1, valid=valid, layout="spatial")
        merged = merge.unmerge(merge.merge(x))
        for i, n in enumerate(lengths):
            ref = tome_reference(x[i:i + 1, :n], min(r, (n - 1) // 2), 1)
            torch.testing.assert_close(merged[i, :n], ref[0], rtol=0, atol=1e-12)


def test_padding_atc_matches_sklearn_clusters():
    gen = torch.Generator().manual_seed(9)
    lengths = [20, 7, 2, 13]
    x, valid = _padded(gen, lengths, 20, 6, 1)
    r = 8
    merge = M.atc_merge(x, r, 1, valid=valid, linkage="average")
    for i, n in enumerate(lengths):
        kept = max(1, n - 1 - r)
        ref = agglomerative_clustering(x[i:i + 1, 1:n], kept, "average", "sklearn")[0] + 1
        assert merge.labels[i, 1:n].tolist() == ref.tolist()


def test_padding_r0_and_errors():
    x, valid = _padded(torch.Generator().manual_seed(1), [9, 4], 9, 3, 1)
    for method in M.MERGE_METHODS:
        merge = M.merge_by_method(method, x, 0, 1, valid=valid)
        assert merge.num_out == 9 and torch.equal(merge.valid, valid) and torch.equal(merge.merge(x), x)
        with pytest.raises(ValueError, match="can remove between 0 and"):
            M.merge_by_method(method, x, M.max_removable(method, 9, 1, masked=True) + 1, 1, valid=valid)
        with pytest.raises(ValueError, match="bool tensor"):
            M.merge_by_method(method, x, 1, 1, valid=valid.long())
    with pytest.raises(ValueError, match="not both"):
        M.bipartite_soft_matching(x, 1, 1, valid=valid, dst_mask=torch.ones(9, dtype=torch.bool))
    assert M.max_removable("atc", 9, 1, masked=True) == 6 and M.max_removable("tome", 9, 1, masked=True) == 3
