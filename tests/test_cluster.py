"""atc.cluster against independent references: scikit-learn on 1 - cos distances computed here in numpy."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from sklearn.cluster import AgglomerativeClustering

from atc import cluster
from atc.cluster import agglomerative_clustering, available_backends, canonical_labels, cosine_distance

LINKAGES = ["single", "complete", "average"]
# triton has its own module (test_cluster_triton.py): through the interpreter it is too slow for these sweeps.
BACKENDS = [b for b in available_backends() if b not in ("cuml", "triton")]


def numpy_cosine_distance(x: np.ndarray) -> np.ndarray:
    """Reference distances, written independently of atc: float64, zero-norm rows have cos 0 with all."""
    x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    d = 1.0 - unit @ unit.T
    d = np.clip((d + d.T) / 2, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def first_occurrence_labels(labels: np.ndarray) -> np.ndarray:
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(v), len(mapping)) for v in labels])


def sklearn_reference(metric: torch.Tensor, k: int, linkage: str) -> np.ndarray:
    out = []
    for sample in metric.double().numpy():
        model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
        out.append(first_occurrence_labels(model.fit_predict(numpy_cosine_distance(sample))))
    return np.stack(out)


def random_metric(gen: torch.Generator, b: int, t: int, c: int, kind: str) -> torch.Tensor:
    if kind == "gauss":
        return torch.randn(b, t, c, generator=gen, dtype=torch.float64)
    # Tight groups around a few centres: many small, nearly equal distances.
    centres = torch.randn(b, max(2, t // 12), c, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, centres.shape[1], (b, t), generator=gen)
    return centres.gather(1, pick.unsqueeze(-1).expand(-1, -1, c)) + 0.05 * torch.randn(
        b, t, c, generator=gen, dtype=torch.float64)


# (T, K) cases covering tiny inputs, K = 1, K = T, the ViT sizes and T = 577 (384 px + CLS).
CASES = [(2, 1), (2, 2), (3, 2), (7, 1), (7, 7), (16, 5), (50, 13), (97, 48), (196, 98), (196, 137), (577, 288)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("linkage", LINKAGES)
def test_every_backend_matches_sklearn_on_random_sweep(linkage, dtype):
    gen = torch.Generator().manual_seed(1234 + LINKAGES.index(linkage))
    for kind in ("gauss", "clustered"):
        for t, k in CASES:
            b = 2 if t > 400 else (4 if t > 100 else 8)
            c = int(torch.randint(2, 65, (1,), generator=gen))
            metric = random_metric(gen, b, t, c, kind).to(dtype)
            expected = sklearn_reference(metric, k, linkage)
            for backend in BACKENDS:
                got = agglomerative_clustering(metric, k, linkage, backend)
                assert got.dtype == torch.long and got.shape == (b, t)
                np.testing.assert_array_equal(
                    got.numpy(), expected, err_msg=f"{backend} {linkage} {kind} T={t} K={k} C={c} {dtype}")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_many_seeds_small_inputs(linkage):
    """Lots of seeded small problems with random K (cheap, catches rare merge-order bugs)."""
    gen = torch.Generator().manual_seed(7)
    for _ in range(150):
        t = int(torch.randint(2, 60, (1,), generator=gen))
        k = int(torch.randint(1, t + 1, (1,), generator=gen))
        metric = torch.randn(2, t, 8, generator=gen)
        expected = sklearn_reference(metric, k, linkage)
        for backend in ("numba", "torch", "fastcluster"):
            if backend in BACKENDS:
                np.testing.assert_array_equal(agglomerative_clustering(metric, k, linkage, backend).numpy(), expected)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_label_convention(linkage):
    metric = torch.randn(4, 60, 16)
    for k in (1, 2, 17, 59, 60):
        labels = agglomerative_clustering(metric, k, linkage)
        assert labels.min() >= 0 and labels.max() < k
        for row in labels.tolist():
            assert len(set(row)) == k
            # Clusters numbered by their smallest token index: first appearances are 0, 1, 2, ...
            firsts = list(dict.fromkeys(row))
            assert firsts == list(range(k))


@pytest.mark.parametrize("linkage", LINKAGES)
def test_torch_and_numba_identical_on_exact_ties(linkage):
    """Duplicate tokens give exactly equal distances; both backends apply the documented tie rule."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 12, 8, generator=gen)
    dup = base[:, torch.randint(0, 12, (40,), generator=gen)]  # 40 tokens, many exact duplicates
    dup[:, 5] = 0.0  # and a zero-norm token
    for k in (1, 3, 8, 12, 20, 39):
        a = agglomerative_clustering(dup, k, linkage, "torch")
        if "numba" in BACKENDS:
            b = agglomerative_clustering(dup, k, linkage, "numba")
            assert torch.equal(a, b), (k, a, b)
        # Exact duplicates are at distance 0 and always end up together once K <= number of distinct tokens.
        if k <= 12:
            for row, ids in zip(a, dup):
                for i in range(40):
                    for j in range(40):
                        if i != 5 and j != 5 and torch.equal(ids[i], ids[j]):
                            assert row[i] == row[j]


def test_tie_rule_lexicographic_pair():
    """Four points where pairs (0,1) and (2,3) are at exactly equal distance: (0,1) merges first."""
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    for backend in ("torch", "numba"):
        if backend in BACKENDS:
            assert agglomerative_clustering(metric, 3, "average", backend).tolist() == [[0, 0, 1, 2]]


@pytest.mark.parametrize("linkage", LINKAGES)
def test_torch_dense_repair_path_matches(linkage):
    """The CUDA code path (dense nearest-neighbour repair, no host sync) runs on CPU here and must agree."""
    metric = torch.randn(5, 80, 12)
    link = cluster.LINKAGES[linkage]
    for k in (1 + 1, 30, 79):
        sparse = cluster._cluster_torch(metric, k, link, dense_repair=False)
        dense = cluster._cluster_torch(metric, k, link, dense_repair=True)
        assert torch.equal(sparse, dense)
        np.testing.assert_array_equal(dense.numpy(), sklearn_reference(metric, k, linkage))


def test_zero_norm_tokens_have_distance_one_and_no_nan():
    metric = torch.randn(2, 10, 4)
    metric[0, 3] = 0.0
    metric[1, 0] = 0.0
    metric[1, 9] = 0.0
    d = cosine_distance(metric)
    assert torch.isfinite(d).all()
    others = [i for i in range(10) if i != 3]
    assert torch.allclose(d[0, 3, others], torch.ones(9, dtype=torch.float64))
    assert d[1, 0, 9] == 1.0
    assert torch.all(torch.diagonal(d, dim1=1, dim2=2) == 0)
    for backend in BACKENDS:
        for linkage in LINKAGES:
            labels = agglomerative_clustering(metric, 4, linkage, backend)
            np.testing.assert_array_equal(labels.numpy(), sklearn_reference(metric, 4, linkage))


def test_extreme_magnitudes_do_not_overflow():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 30, 6, generator=gen, dtype=torch.float64)
    scaled = base.clone()
    scaled[0, :10] *= 1e200
    scaled[0, 10:20] *= 1e-200
    d = cosine_distance(scaled)
    assert torch.isfinite(d).all()
    assert torch.allclose(d, cosine_distance(base), atol=1e-12)
    for linkage in LINKAGES:
        assert torch.equal(agglomerative_clustering(scaled, 7, linkage), agglomerative_clustering(base, 7, linkage))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype(dtype):
    metric = torch.randn(2, 30, 8).to(dtype)
    labels = agglomerative_clustering(metric, 10, "complete")
    np.testing.assert_array_equal(labels.numpy(), sklearn_reference(metric, 10, "complete"))


def test_cosine_distance_matches_numpy():
    metric = torch.randn(3, 20, 7)
    ref = np.stack([numpy_cosine_distance(m) for m in metric.numpy()])
    np.testing.assert_allclose(cosine_distance(metric).numpy(), ref, atol=1e-12)


def test_empty_batch_and_trivial_k():
    assert agglomerative_clustering(torch.randn(0, 5, 3), 2).shape == (0, 5)
    assert agglomerative_clustering(torch.randn(2, 5, 3), 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert agglomerative_clustering(torch.randn(2, 5, 3), 1).tolist() == [[0] * 5] * 2
    assert agglomerative_clustering(torch.randn(1, 1, 3), 1).tolist() == [[0]]


def test_num_clusters_accepts_integer_types():
    metric = torch.randn(1, 10, 4)
    ref = agglomerative_clustering(metric, 4)
    assert torch.equal(agglomerative_clustering(metric, np.int64(4)), ref)
    assert torch.equal(agglomerative_clustering(metric, torch.tensor(4)), ref)


@pytest.mark.parametrize(
    "metric, k, linkage, backend, error, match",
    [
        (torch.randn(1, 5, 3), 0, "average", "auto", ValueError, "between 1 and"),
        (torch.randn(1, 5, 3), 6, "average", "auto", ValueError, "between 1 and"),
        (torch.randn(1, 5, 3), -2, "average", "auto", ValueError, "between 1 and"),
        (torch.randn(1, 5, 3), 2.0, "average", "auto", TypeError, "integer"),
        (torch.randn(1, 5, 3), True, "average", "auto", TypeError, "integer"),
        (torch.randn(1, 5, 3), "2", "average", "auto", TypeError, "integer"),
        (torch.randn(1, 5, 3), torch.tensor(2.0), "average", "auto", TypeError, "integer"),
        (torch.randn(5, 3), 2, "average", "auto", ValueError, "shape"),
        (torch.randn(1, 1, 5, 3), 2, "average", "auto", ValueError, "shape"),
        (torch.randn(1, 0, 3), 1, "average", "auto", ValueError, "no tokens"),
        (torch.randn(1, 4, 0), 1, "average", "auto", ValueError, "no channels"),
        (torch.tensor([[[1.0, float("nan")], [0.0, 1.0]]]), 1, "average", "auto", ValueError, "NaN"),
        (torch.tensor([[[1.0, float("inf")], [0.0, 1.0]]]), 1, "average", "auto", ValueError, "infinite"),
        (torch.ones(1, 4, 2, dtype=torch.long), 2, "average", "auto", TypeError, "floating"),
        (np.ones((1, 4, 2)), 2, "average", "auto", TypeError, "torch.Tensor"),
        (torch.randn(1, 5, 3), 2, "ward", "auto", ValueError, "unknown linkage"),
        (torch.randn(1, 5, 3), 2, "average", "gpu-magic", ValueError, "unknown backend"),
    ],
)
def test_bad_input_errors(metric, k, linkage, backend, error, match):
    with pytest.raises(error, match=match):
        agglomerative_clustering(metric, k, linkage, backend)


def test_available_backends_and_auto():
    names = available_backends()
    assert "torch" in names and "scipy" in names and "sklearn" in names
    assert cluster.resolve_backend("auto", "cpu") == ("numba" if "numba" in names else "fastcluster")
    assert cluster.resolve_backend("auto", "cuda") == ("triton" if "triton" in names else "torch")


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cluster, "_installed", lambda name: name != "fastcluster")
    with pytest.raises(cluster.BackendUnavailableError, match="pip install fastcluster"):
        agglomerative_clustering(torch.randn(1, 5, 3), 2, backend="fastcluster")
    assert "fastcluster" not in available_backends()


def test_cuml_backend_glue_with_fake_module(monkeypatch):
    """RAPIDS is not installable here: check our glue against a stand-in with cuML's API backed by sklearn."""

    class FakeAgglomerative:
        def __init__(self, n_clusters, metric, linkage, connectivity):
            assert metric == "cosine" and linkage == "single" and connectivity == "pairwise"
            self.n_clusters = n_clusters

        def fit_predict(self, x):
            x = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
            labels = AgglomerativeClustering(self.n_clusters, metric="precomputed", linkage="single").fit_predict(
                numpy_cosine_distance(x))
            return (labels + 5) * 3  # arbitrary label values, as cuML's may be

    fake = types.ModuleType("cuml")
    fake.cluster = types.SimpleNamespace(AgglomerativeClustering=FakeAgglomerative)
    monkeypatch.setitem(sys.modules, "cuml", fake)
    monkeypatch.setitem(sys.modules, "cuml.cluster", fake.cluster)
    monkeypatch.setattr(cluster, "_installed", lambda name: True)
    metric = torch.randn(3, 25, 6)
    got = agglomerative_clustering(metric, 6, "single", "cuml")
    np.testing.assert_array_equal(got.numpy(), sklearn_reference(metric, 6, "single"))
    with pytest.raises(ValueError, match="single linkage only"):
        agglomerative_clustering(metric, 6, "average", "cuml")


def test_canonical_labels():
    labels = torch.tensor([[5, 5, 2, 9, 2, 0], [1, 0, 0, 1, 3, 3]])
    assert canonical_labels(labels).tolist() == [[0, 0, 1, 2, 1, 3], [0, 1, 1, 0, 2, 2]]


def test_result_on_metric_device_and_input_untouched():
    metric = torch.randn(2, 20, 5)
    before = metric.clone()
    for backend in BACKENDS:
        out = agglomerative_clustering(metric, 5, "average", backend)
        assert out.device == metric.device
    assert torch.equal(metric, before)


def test_backends_agree_across_chunk_boundaries(monkeypatch):
    """CPU backends process chunks of samples; samples in different chunks must see the same values."""
    monkeypatch.setattr(cluster, "_CHUNK_BYTES", 1 << 16)  # small chunks: the boundaries at a small T
    gen = torch.Generator().manual_seed(11)
    t, b = 100, 7
    assert cluster._chunk_size(b, t, torch.device("cpu")) < b
    base = torch.randn(b, 20, 8, generator=gen)
    metric = base[:, torch.randint(0, 20, (t,), generator=gen)]  # exact duplicates everywhere
    for linkage in LINKAGES:
        ref = agglomerative_clustering(metric, 17, linkage, "torch")
        if "numba" in BACKENDS:
            assert torch.equal(agglomerative_clustering(metric, 17, linkage, "numba"), ref)
        # The same sample gives the same labels wherever it sits in the batch.
        single = agglomerative_clustering(metric[-1:], 17, linkage, "torch")
        assert torch.equal(single[0], ref[-1])


# ------------------------------------------------------------------------------------------------ padding
def masked_reference(metric: torch.Tensor, k: int, linkage: str, valid: torch.Tensor) -> np.ndarray:
    """The documented rule, written out: each sample's real tokens clustered alone by scikit-learn into
    max(1, n - r) clusters (r = T - K), then its padding tokens after them, one label each in token order, the
    first ones sharing a label when the sample gave up fewer than r real tokens."""
    b, t, _ = metric.shape
    r = t - k
    out = np.empty((b, t), dtype=np.int64)
    for i in range(b):
        real = [j for j in range(t) if valid[i, j]]
        padding = [j for j in range(t) if not valid[i, j]]
        kept = max(1, len(real) - r) if real else 0
        if real:
            out[i, real] = sklearn_reference(metric[i:i + 1, real], kept, linkage)[0] if kept < len(real) else \
                range(len(real))
        surplus = r - (len(real) - kept)
        for n, j in enumerate(padding):
            out[i, j] = kept + max(0, n - surplus)
    return out


def padded_batch(gen: torch.Generator, t: int, c: int, lengths: list[int], scattered: bool = False):
    """A (len(lengths), t, c) metric with each sample's real tokens first (``scattered``: at random positions)
    and garbage, NaN included, in the padding, which must never be read."""
    metric = torch.randn(len(lengths), t, c, generator=gen)
    valid = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        pos = torch.randperm(t, generator=gen)[:n] if scattered else torch.arange(n)
        valid[i, pos] = True
    metric[~valid] = float("nan")
    return metric, valid


@pytest.mark.parametrize("linkage", LINKAGES)
def test_padding_every_backend_matches_per_sample_reference(linkage):
    """Mixed lengths (one sample with no padding, one with a single real token), real tokens first or scattered,
    K from no merge to K = 2: the real tokens' labels are those of clustering each sample alone."""
    gen = torch.Generator().manual_seed(21 + LINKAGES.index(linkage))
    for t, c, lengths, scattered in [(9, 4, [9, 1, 5, 3], False), (30, 8, [30, 1, 17, 29, 12], False),
                                     (30, 8, [30, 1, 2, 21, 9], True), (64, 16, [40, 64, 7], False)]:
        metric, valid = padded_batch(gen, t, c, lengths, scattered)
        for k in sorted({2, 3, t // 2, t - 5, t - 1, t}):
            expected = masked_reference(metric.nan_to_num(), k, linkage, valid)
            for backend in BACKENDS:
                got = agglomerative_clustering(metric, k, linkage, backend, valid=valid)
                np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"{backend} T={t} K={k} {lengths}")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_padding_torch_and_numba_identical_on_exact_ties(linkage):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(4, 10, 6, generator=gen)
    metric = base[:, torch.randint(0, 10, (36,), generator=gen)]  # exact duplicates everywhere
    valid = torch.ones(4, 36, dtype=torch.bool)
    valid[1, 20:] = False
    valid[2, ::3] = False
    valid[3, 1:] = False
    for k in (2, 9, 20, 35):
        ref = agglomerative_clustering(metric, k, linkage, "torch", valid=valid)
        if "numba" in BACKENDS:
            assert torch.equal(agglomerative_clustering(metric, k, linkage, "numba", valid=valid), ref)
        dense = cluster._cluster_torch(metric, k, cluster.LINKAGES[linkage], dense_repair=True, valid=valid)
        assert torch.equal(cluster.real_clusters_first(dense, valid, k), ref)


def test_padding_without_padding_is_unmasked_clustering_and_errors():
    metric = torch.randn(3, 12, 4)
    full = torch.ones(3, 12, dtype=torch.bool)
    for backend in BACKENDS:
        assert torch.equal(agglomerative_clustering(metric, 5, "average", backend, valid=full),
                           agglomerative_clustering(metric, 5, "average", backend))
    assert agglomerative_clustering(metric, 1, valid=full).eq(0).all()
    padded = full.clone()
    padded[0, 6:] = False
    with pytest.raises(ValueError, match="num_clusters=1 leaves no cluster for padding"):
        agglomerative_clustering(metric, 1, valid=padded)
    with pytest.raises(TypeError, match="bool tensor"):
        agglomerative_clustering(metric, 5, valid=padded.long())
    with pytest.raises(ValueError, match=r"\(B, T\) = \(3, 12\)"):
        agglomerative_clustering(metric, 5, valid=padded[:, :6])
    # padding content is never read, and the NaN check still covers real tokens
    metric[0, 8] = float("nan")
    agglomerative_clustering(metric, 5, valid=padded)
    with pytest.raises(ValueError, match="NaN"):
        agglomerative_clustering(metric, 5, valid=full)


def test_padding_traces_as_the_custom_op():
    metric, valid = padded_batch(torch.Generator().manual_seed(2), 20, 8, [20, 7, 1])
    fn = torch.compile(lambda m, v: agglomerative_clustering(m, 9, "complete", valid=v), backend="aot_eager",
                       fullgraph=True)
    assert torch.equal(fn(metric, valid), agglomerative_clustering(metric, 9, "complete", valid=valid))


def test_clustering_threads_setting(monkeypatch):
    """One setting for the CPU clustering threads: default 1 (no second OpenMP runtime's workers next to torch's),
    ATC_CLUSTER_THREADS or set_num_threads to change it; the labels never depend on it."""
    numba = pytest.importorskip("numba")
    monkeypatch.delenv("ATC_CLUSTER_THREADS", raising=False)
    monkeypatch.setattr(cluster, "_num_threads", None)  # whatever an earlier test (the digits job's --threads) set
    assert cluster.get_num_threads() == 1
    seen = []
    real = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda n: (seen.append(n), real(n)))
    metric = torch.randn(6, 40, 8)
    torch_threads = torch.get_num_threads()
    one = agglomerative_clustering(metric, 11, "average", "numba")
    assert numba.get_num_threads() == (seen[-1] if seen else 1)  # restored afterwards (or never changed)
    # numba's OpenMP layer sets the process's OpenMP thread count, torch's too: it is put back
    assert torch.get_num_threads() == torch_threads
    monkeypatch.setenv("ATC_CLUSTER_THREADS", "2")
    assert cluster.get_num_threads() == 2
    try:
        cluster.set_num_threads(2)
        assert torch.equal(agglomerative_clustering(metric, 11, "average", "numba"), one)
        assert min(2, numba.config.NUMBA_NUM_THREADS) in seen
        assert torch.get_num_threads() == torch_threads
    finally:
        cluster.set_num_threads(None)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            cluster.set_num_threads(bad)
    monkeypatch.setenv("ATC_CLUSTER_THREADS", "many")
    with pytest.raises(ValueError, match="ATC_CLUSTER_THREADS"):
        cluster.get_num_threads()
