"""Adding a linkage is one entry in atc.cluster.LINKAGES.

A toy linkage, WPGMA ("weighted": ``d(a ∪ b, k) = (d(a, k) + d(b, k)) / 2``), is added by one line
(:func:`add_weighted`) and must then be accepted by the clustering backends that declare it (torch through its
update, scipy and fastcluster through ``scipy_method``), refused with a clear error by those that do not, used
by the patchers, and offered by every CLI with a ``--linkage`` flag (rejected again once it is removed). The
reference is scipy's own WPGMA (``scipy.cluster.hierarchy.linkage(method="weighted")`` cut by ``fcluster``),
on cosine distances computed here in numpy.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

import atc.cluster
import atc.merge
import atc.patch
from atc.cluster import Linkage, agglomerative_clustering, available_backends, resolve_backend

from _vit_reference import randomize

ROOT = Path(__file__).resolve().parents[1]


def _wpgma(d_ak: torch.Tensor, d_bk: torch.Tensor, n_a: torch.Tensor, n_b: torch.Tensor) -> torch.Tensor:
    return (d_ak + d_bk) / 2


def add_weighted(mp: pytest.MonkeyPatch) -> None:
    """The one place: a Linkage entry with its update and scipy's name for it."""
    mp.setitem(atc.cluster.LINKAGES, "weighted", Linkage("weighted", _wpgma, scipy_method="weighted"))


@pytest.fixture
def weighted(monkeypatch):
    add_weighted(monkeypatch)


# ------------------------------------------------------------------------------------------------ reference
def _partition(labels) -> list[int]:
    """Labels renumbered by first occurrence, so two labelings of one partition compare equal."""
    first: dict[int, int] = {}
    return [first.setdefault(int(v), len(first)) for v in labels]


def scipy_partition(tokens: np.ndarray, k: int, method: str = "weighted") -> list[int]:
    """scipy's partition of one sample ``(T, C)`` into ``k`` clusters on cosine distance; asserts that the cut is
    not a near tie (else rounding could legitimately pick either side)."""
    u = tokens.astype(np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    d = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    z = scipy_linkage(squareform(d, checks=False), method=method)
    t = tokens.shape[0]
    if 1 < k < t:
        heights = z[:, 2]
        assert heights[t - k] - heights[t - k - 1] > 1e-9, "near tie at the cut: pick another seed"
    labels = fcluster(z, k, criterion="maxclust")
    assert len(set(labels)) == k
    return _partition(labels)


def _metric(seed: int, b: int, t: int, c: int) -> torch.Tensor:
    return torch.randn(b, t, c, generator=torch.Generator().manual_seed(seed))


CASES = [(0, 3, 12, 4, 5), (1, 2, 40, 9, 8), (2, 4, 64, 20, 6), (3, 1, 97, 30, 16), (4, 2, 33, 32, 4)]


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("backend", ["torch", "scipy", "fastcluster"])
def test_backends_that_declare_it_match_scipy(weighted, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    assert backend in available_backends("weighted")
    differs_from_average = False
    for seed, b, t, k, c in CASES:
        metric = _metric(seed, b, t, c)
        labels = agglomerative_clustering(metric, k, "weighted", backend)
        assert labels.shape == (b, t) and labels.dtype == torch.long
        for i in range(b):
            expected = scipy_partition(metric[i].numpy(), k)
            assert _partition(labels[i].tolist()) == expected, (seed, i)
            differs_from_average |= expected != scipy_partition(metric[i].numpy(), k, "average")
    assert differs_from_average, "the cases cannot tell weighted from average linkage"


@pytest.mark.parametrize("backend", ["numba", "sklearn", "triton", "cuml"])
def test_backends_without_it_refuse_it_by_name(weighted, backend):
    """Installed or not, a backend without the linkage says so and names the ones that have it; it never runs
    another linkage instead."""
    assert backend not in available_backends("weighted")
    with pytest.raises(ValueError, match=rf"{backend} clustering backend does not implement 'weighted' linkage"
                                         rf".*torch, scipy, fastcluster backends"):
        agglomerative_clustering(_metric(0, 2, 10, 3), 4, "weighted", backend)
    with pytest.raises(ValueError, match="does not implement 'weighted'"):
        resolve_backend(backend, "cpu", "weighted")


def test_auto_picks_a_backend_that_has_it(weighted):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atc.cluster, "_installed", lambda name: True)  # every backend installed, CUDA too
        assert resolve_backend("auto", "cuda", "weighted") == "torch"  # not triton
        assert resolve_backend("auto", "cuda", "average") == "triton"
        assert resolve_backend("auto", "cpu", "weighted") in ("torch", "scipy", "fastcluster")
        assert resolve_backend("auto", "cpu", "average") == resolve_backend("auto", "cpu") == "numba"
    metric = _metric(5, 2, 30, 6)
    labels = agglomerative_clustering(metric, 7, "weighted")  # auto
    assert [_partition(row.tolist()) for row in labels] == [scipy_partition(m.numpy(), 7) for m in metric]


def test_compiled_kernels_refuse_an_id_they_do_not_have():
    """Called directly (not through atc.cluster), the kernels refuse an unknown id instead of running the
    nearest one."""
    from atc._numba_cluster import cluster_gram_blocks

    labels = np.empty((1, 4), dtype=np.int64)
    for bad in (None, -1, 3):
        with pytest.raises(ValueError, match="no compiled linkage"):
            cluster_gram_blocks(np.zeros(16), np.array([[0, 4]]), 2, bad, labels)
    if importlib.util.find_spec("triton") is not None:
        from atc._triton_cluster import cluster_gram

        for bad in (None, -1, 3):
            with pytest.raises(ValueError, match="no linkage with id"):
                cluster_gram(torch.zeros(1, 4, 4, dtype=torch.float64), 2, bad, torch.zeros(1, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------ patchers
def _spy(monkeypatch) -> list[dict]:
    """Record every clustering call of atc.merge's ATC method."""
    calls: list[dict] = []
    real = atc.merge.agglomerative_clustering

    def spy(metric, num_clusters, linkage, backend):
        labels = real(metric, num_clusters, linkage, backend)
        calls.append(dict(metric=metric.detach().clone(), k=num_clusters, linkage=linkage, labels=labels))
        return labels

    monkeypatch.setattr(atc.merge, "agglomerative_clustering", spy)
    return calls


def _scipy_oracle(metric, num_clusters, linkage, backend):
    """Stand-in for agglomerative_clustering that takes its clusters from scipy's WPGMA."""
    rows = [scipy_partition(m.numpy(), num_clusters) for m in metric]
    return torch.tensor(rows, dtype=torch.long, device=metric.device)


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return randomize(VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5))


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return randomize(VisionTransformer(image_size=32, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32,
                                       mlp_dim=64, num_classes=5))


@pytest.mark.parametrize("patcher, make", [("timm", _timm_vit), ("swag", _torchvision_vit)])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_patchers_merge_with_it(weighted, monkeypatch, patcher, make, backend):
    model = make()
    getattr(atc.patch, patcher)(model, method="atc", linkage="weighted", backend=backend)
    model.r = [20, 12, 0]  # 64 patches -> 44 -> 32
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = _spy(monkeypatch)
    with torch.no_grad():
        out = model(x)
    assert [(c["linkage"], c["k"], c["metric"].shape[1]) for c in calls] == [("weighted", 44, 64), ("weighted", 32, 44)]
    for call in calls:  # the clusters each block used are scipy's
        for metric, labels in zip(call["metric"], call["labels"]):
            assert _partition(labels.tolist()) == scipy_partition(metric.numpy(), call["k"])
    # and the forward is the one that scipy's clusters give
    monkeypatch.setattr(atc.merge, "agglomerative_clustering", _scipy_oracle)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_patching_with_a_backend_without_it_fails_at_patch_time(weighted):
    model = _timm_vit()
    with pytest.raises(ValueError, match="numba clustering backend does not implement 'weighted'"):
        atc.patch.timm(model, method="atc", linkage="weighted", backend="numba")
    with pytest.raises(ValueError, match="numba clustering backend does not implement 'weighted'"):
        atc.patch.swag(_torchvision_vit(), method="atc", linkage="weighted", backend="numba")
    atc.patch.timm(model, method="tome", linkage="weighted", backend="numba")  # ToMe does not cluster


def test_detection_backbone_takes_it():
    from atc.detection.vit_adapter import ViTAdapter

    small = dict(embed_dim=48, depth=4, num_heads=2, interaction_indexes=[[0, 1], [2, 3]], reduction_loc=[1],
                 reduction_ratio=0.7, conv_inplane=8, deform_num_heads=2, use_extra_extractor=False)
    with pytest.MonkeyPatch.context() as mp:
        add_weighted(mp)
        assert ViTAdapter(**small, method="atc", linkage="weighted").blocks[1].linkage == "weighted"
    with pytest.raises(ValueError, match="unknown linkage 'weighted'"):
        ViTAdapter(**small, method="atc", linkage="weighted")


# ------------------------------------------------------------------------------------------------ CLIs
# (script, function that builds or parses the arguments, flag, (extra check after parsing, its arguments)).
# The training scripts take any string at parse time and check it against LINKAGES when they validate their
# arguments, before building anything: that check is run too.
CLIS = [
    ("benchmark_atc_framework.py", "parse_args", "--linkage", None),
    ("benchmark_merging_method.py", "parse_args", "--linkage", None),
    ("validate_ots_sslbackbone.py", "parse_args", "--linkage", None),
    ("visualize_merging.py", "parse_args", "--linkage", None),
    ("SD_setup/benchmark_diffusion.py", "build_parser", "--linkage", None),
    ("SD_setup/sd_generate.py", "build_parser", "--linkage", None),
    ("MMDet_setup/benchmark_backbone.py", "parse_args", "--methods", None),
    ("train_deit.py", "get_args_parser", "--linkage", ("check_args", ["--dataset", "digits"])),
    ("train_mae.py", "get_args_parser", "--linkage", ("check_args", ["--dataset", "digits"])),
    ("validate_deit.py", "get_args_parser", "--linkage",
     ("resolve_config", ["--dataset", "digits", "--model", "atc_tiny_patch16_224", "--ots"])),
]


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _load(script: str, monkeypatch):
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"toy_linkage_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _build_parser(module, func: str) -> argparse.ArgumentParser:
    """The parser as the script builds it now (with the choices of this moment); nothing is parsed."""
    if func != "parse_args":
        return getattr(module, func)()

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parser) as caught:
            module.parse_args([])
    return caught.value.parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` only: other required flags are not asked for."""
    for action in parser._actions:
        action.required = False
    for group in parser._mutually_exclusive_groups:
        group.required = False
    return parser.parse_args(argv)


@pytest.mark.parametrize("script, func, flag, check", CLIS, ids=[c[0] for c in CLIS])
def test_clis_accept_it_while_it_is_in_the_table(script, func, flag, check, monkeypatch, capsys):
    module = _load(script, monkeypatch)

    def run(extra_check: bool) -> argparse.Namespace:
        args = _parse(_build_parser(module, func), [*(check[1] if check else []), flag, "weighted"])
        if extra_check and check:
            name, _ = check
            getattr(module, name)(args, {}) if name == "resolve_config" else getattr(module, name)(args)
        return args

    with pytest.MonkeyPatch.context() as mp:
        add_weighted(mp)
        args = run(extra_check=True)
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        assert value == "weighted" or value == ["weighted"]
    # removed again: the next parser (or the script's own check) refuses it
    if check is None:
        with pytest.raises(SystemExit):
            run(extra_check=False)
        assert "invalid choice: 'weighted'" in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match="unknown linkage 'weighted'"):
            run(extra_check=True)
