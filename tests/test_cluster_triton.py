"""The triton clustering backend against the numba backend (identical labels, ties included) and scikit-learn.

Without a GPU the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
Triton is imported): the same kernel code, executed with numpy on CPU. With a GPU it runs compiled on ``cuda``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

from atc import cluster  # noqa: E402
from atc.cluster import agglomerative_clustering, available_backends, resolve_backend  # noqa: E402

from test_cluster import sklearn_reference  # noqa: E402

LINKAGES = ["single", "complete", "average"]
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before Triton was imported (tests/conftest.py sets "
                "it)", allow_module_level=True)


def make_metric(gen: torch.Generator, b: int, t: int, c: int, kind: str) -> torch.Tensor:
    """Seeded inputs of several kinds: plain Gaussian, tight clusters (many near-equal distances), duplicated
    tokens (exact ties), rounded small integers (many exact ties), and zero-norm tokens."""
    x = torch.randn(b, t, c, generator=gen)
    if kind == "clustered":
        centres = torch.randn(b, max(2, t // 10), c, generator=gen)
        pick = torch.randint(0, centres.shape[1], (b, t), generator=gen)
        x = centres.gather(1, pick.unsqueeze(-1).expand(-1, -1, c)) + 0.05 * x
    elif kind == "duplicated":
        x = x[:, torch.randint(0, max(1, t // 3), (t,), generator=gen)]
    elif kind == "rounded":
        x = x.round()
    elif kind == "zeros":
        x[:, ::5] = 0.0
    return x


def triton_labels(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    return agglomerative_clustering(metric.to(DEVICE), k, linkage, "triton").cpu()


# (T, K): tiny inputs, K near both ends, the ViT sizes (196 tokens; 197 with a class token) and ~300 (vectors of
# 512). The interpreter's cost is per merge step, so the long cases merge only as much as their point needs: down
# to K = 2 at T = 40, and T = 300 (the next vector width) with 50 merges.
CASES = [(3, 2), (5, 3), (9, 1), (16, 15), (33, 7), (64, 32), (40, 2), (197, 98), (200, 150), (300, 250)]


@pytest.mark.parametrize("linkage", LINKAGES)
def test_identical_to_numba_and_same_partitions_as_sklearn(linkage):
    gen = torch.Generator().manual_seed(100 + LINKAGES.index(linkage))
    for i, (t, k) in enumerate(CASES):
        kind = ["gauss", "clustered", "duplicated", "rounded", "zeros"][i % 5]
        b = 3 if t > 150 else 4
        metric = make_metric(gen, b, t, int(torch.randint(2, 33, (1,), generator=gen)), kind)
        got = triton_labels(metric, k, linkage)
        assert got.dtype == torch.long and got.shape == (b, t)
        expected = agglomerative_clustering(metric, k, linkage, "numba")
        assert torch.equal(got, expected), f"{linkage} {kind} T={t} K={k}"
        if kind in ("gauss", "clustered"):  # no exact ties: scikit-learn's partition is the same
            np.testing.assert_array_equal(got.numpy(), sklearn_reference(metric, k, linkage))


@pytest.mark.parametrize("linkage", LINKAGES)
def test_many_seeded_small_problems(linkage):
    """Many small problems with random T and K, several per launch (rare merge-order and tie bugs)."""
    gen = torch.Generator().manual_seed(7 + LINKAGES.index(linkage))
    for trial in range(16):
        t = int(torch.randint(3, 48, (1,), generator=gen))
        k = int(torch.randint(2, t, (1,), generator=gen))
        kind = ["gauss", "duplicated", "rounded", "zeros"][trial % 4]
        metric = make_metric(gen, 6, t, 4, kind)
        assert torch.equal(triton_labels(metric, k, linkage),
                           agglomerative_clustering(metric, k, linkage, "numba")), (trial, kind, t, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reduced_and_double_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(11)
    metric = torch.randn(4, 50, 16, generator=gen).to(dtype)
    for linkage in LINKAGES:
        assert torch.equal(triton_labels(metric, 20, linkage), agglomerative_clustering(metric, 20, linkage, "numba"))


def test_padding_identical_to_numba():
    """Padded batches (mixed lengths, one sample with a single real token, one without padding, one with scattered
    padding): the masked kernel gives numba's labels, which tests/test_cluster.py checks against per-sample
    scikit-learn clustering."""
    gen = torch.Generator().manual_seed(17)
    for t, kind in [(21, "duplicated"), (40, "gauss")]:
        metric = make_metric(gen, 4, t, 8, kind)
        valid = torch.ones(4, t, dtype=torch.bool)
        valid[1, 1:] = False
        valid[2, t // 2:] = False
        valid[3, ::4] = False
        for linkage in LINKAGES:
            for k in (2, t // 2, t - 3):
                expected = agglomerative_clustering(metric, k, linkage, "numba", valid=valid)
                got = agglomerative_clustering(metric.to(DEVICE), k, linkage, "triton", valid=valid.to(DEVICE)).cpu()
                assert torch.equal(got, expected), (t, kind, linkage, k)


@pytest.mark.skipif(ON_GPU, reason="the launch configuration of a GPU is what runs there anyway")
def test_one_sample_per_program_as_on_a_gpu():
    """A GPU runs one sample per program; the interpreter batches samples. Both configurations agree."""
    from atc._triton_cluster import cluster_gram

    gen = torch.Generator().manual_seed(5)
    for linkage_id, linkage in enumerate(LINKAGES):
        for t, k, kind in [(40, 13, "duplicated"), (70, 40, "gauss")]:  # vectors of 64 and 128
            metric = make_metric(gen, 2, t, 8, kind)
            flag = torch.zeros(1, dtype=torch.int32)
            got = cluster_gram(cluster._gram_square(metric, True), k, linkage_id, flag, samples_per_program=1)
            assert torch.equal(got, agglomerative_clustering(metric, k, linkage, "numba"))
            assert flag.item() == 0


def test_listed_on_cpu_only_under_the_interpreter(monkeypatch):
    if ON_GPU:
        assert "triton" in available_backends()
        assert resolve_backend("auto", "cuda") == "triton"
        return
    assert "triton" in available_backends()
    assert resolve_backend("auto", "cuda") == "triton"  # the default on CUDA when Triton is importable
    assert resolve_backend("auto", "cpu") != "triton"  # never the default on CPU
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in available_backends()
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(cluster.BackendUnavailableError, match="TRITON_INTERPRET"):
        agglomerative_clustering(torch.randn(1, 8, 4), 3, "average", "triton")


def test_nonfinite_metric_is_an_error():
    metric = torch.randn(2, 20, 8)
    metric[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        triton_labels(metric, 10, "average")
    metric[1, 3, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        triton_labels(metric, 10, "average")
    if ON_GPU:
        cluster.check_nonfinite()  # reported: nothing left over


def test_device_side_report_without_waiting(monkeypatch):
    """On CUDA the check runs in the kernel and is reported by the next call (no host synchronisation); the
    same mechanism, forced on CPU here: placeholder labels for the bad sample, exact labels for the others."""
    monkeypatch.setattr(cluster, "_defers_checks", lambda device: True)
    gen = torch.Generator().manual_seed(9)
    metric = torch.randn(3, 30, 8, generator=gen)
    metric[1, 4, 2] = float("nan")
    labels = triton_labels(metric, 12, "complete")
    good = metric[[0, 2]]
    assert torch.equal(labels[[0, 2]], agglomerative_clustering(good, 12, "complete", "numba"))
    assert torch.equal(labels[1], torch.arange(30).clamp(max=11))
    with pytest.raises(ValueError, match="reports one call late"):
        triton_labels(good, 12, "complete")
    triton_labels(good, 12, "complete")  # reported once, then cleared
    triton_labels(metric, 12, "complete")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cluster.check_nonfinite(DEVICE)
    cluster.check_nonfinite(DEVICE)


def test_token_limit_is_a_clear_error():
    from atc._triton_cluster import MAX_TOKENS

    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} tokens.*backend='torch'"):
        agglomerative_clustering(torch.randn(1, MAX_TOKENS + 1, 1, device=DEVICE), 2, "single", "triton")


def test_traces_as_one_custom_op():
    """Under torch.compile the call is the custom operator: no graph break, same labels as eager."""
    metric = torch.randn(2, 24, 8, device=DEVICE)
    fn = torch.compile(lambda m: agglomerative_clustering(m, 10, "average", "triton"), backend="aot_eager",
                       fullgraph=True)
    assert torch.equal(fn(metric), agglomerative_clustering(metric, 10, "average", "triton"))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_no_host_synchronisation_on_cuda():
    metric = torch.randn(8, 197, 64, device="cuda", dtype=torch.float16)
    agglomerative_clustering(metric, 98, "average", "triton")  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        agglomerative_clustering(metric, 98, "average", "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


COMPILE_FOR_SM90 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import atc._triton_cluster as tc

sig = {"gram_ptr": "*fp64", "dist_ptr": "*fp64", "nnd_ptr": "*fp64", "labels_ptr": "*i64", "flag_ptr": "*i32",
       "valid_ptr": "*u8", "B": "i32", "T": "i32", "num_clusters": "i32",
       "LINKAGE": "constexpr", "S": "constexpr", "TP": "constexpr", "BR": "constexpr", "MASKED": "constexpr"}
for t, linkage, masked in [(196, 0, False), (196, 1, False), (196, 2, False), (4096, 2, False), (196, 2, True)]:
    spp, tp, num_warps, br = tc.launch_config(t, 256, interpreted=False)
    src = ASTSource(tc._cluster_kernel, sig, constexprs={"LINKAGE": linkage, "S": spp, "TP": tp, "BR": br,
                                                         "MASKED": masked})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": False})
    ptx = kernel.asm["ptx"]
    print(t, linkage, "fma.rn.f64" in ptx, "div.rn.f64" in ptx)
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests run the compiled kernel itself")
def test_compiles_for_a_gpu_without_fused_multiply_add(tmp_path):
    """The interpreter does not compile the kernel: compile it for an H100/H200 (sm_90) here, without a GPU, so
    that code the GPU path cannot compile fails in CI. The average linkage must not be contracted into FMAs
    (they round differently from numba's separate multiply and add) and must divide exactly (div.rn)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("196", "0"), ("196", "1"), ("196", "2"), ("4096", "2"), ("196", "2")]
    assert all(r[2] == "False" for r in rows), rows  # no fma.rn.f64 anywhere
    assert all(r[3] == "True" for r in rows if r[1] == "2"), rows  # the average linkage divides exactly
