"""atc.patch.swag on torchvision's VisionTransformer: r=0 identity, brute-force merged block, counts, remove."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

import atc.patch


def _make() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _ref_clusters(metric_row, method, r, linkage):
    t = metric_row.shape[0]
    m = F.normalize(metric_row.double(), dim=-1)
    if method == "atc":
        d = (1 - m[1:] @ m[1:].T).clamp_min(0).numpy()
        np.fill_diagonal(d, 0)
        lab = AgglomerativeClustering(n_clusters=t - 1 - r, metric="precomputed", linkage=linkage).fit_predict(d)
        groups: dict[int, list[int]] = {}
        for i, l in enumerate(lab):
            groups.setdefault(int(l), []).append(i + 1)
    else:
        src = [i for i in range(1, t) if i % 2 == 0]
        dst = [i for i in range(1, t) if i % 2 == 1]
        best = sorted(((max(float(m[s] @ m[d]) for d in dst), s,
                        dst[int(np.argmax([float(m[s] @ m[d]) for d in dst]))]) for s in src), key=lambda e: -e[0])
        target = {s: d for _, s, d in best[:r]}
        groups = {}
        for i in range(1, t):
            groups.setdefault(target.get(i, i), []).append(i)
    return [[0]] + sorted(groups.values(), key=min)


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
def test_r0_equals_unpatched(method):
    model = _make()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        atc.patch.swag(model, method=method)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
        atc.patch.remove(model)
        assert type(model) is VisionTransformer
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("method,linkage", [("atc", "average"), ("atc", "single"), ("tome", "average")])
def test_merged_block_matches_brute_force(method, linkage):
    model = _make()
    # the reference lists clusters in spatial order; ToMe's published layout is checked in test_fidelity.py
    atc.patch.swag(model, method=method, linkage=linkage, layout="spatial")
    model.r = [3, 4, 0]
    blk = model.encoder.layers[1]
    rec = {}

    def pre(_m, args):
        rec["x"] = args[0].clone()
        rec["size"] = model._atc_state.size.clone()

    hooks = [blk.register_forward_pre_hook(pre), blk.register_forward_hook(lambda _m, _a, o: rec.update(out=o))]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        x, size = rec["x"], rec["size"]
        mha = blk.self_attention
        b, n, c = x.shape
        h = blk.ln_1(x)
        q, k, v = (F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
        q, k, v = (t.reshape(b, n, 2, c // 2).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-2, -1) / (c // 2) ** 0.5 + size.log()[:, None, None, :, 0]
        attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x1 = x + mha.out_proj(attn)
        metric = k.mean(1)
        merged = torch.stack([
            torch.stack([(x1[i, cl] * size[i, cl]).sum(0) / size[i, cl].sum()
                         for cl in _ref_clusters(metric[i], method, 4, linkage)])
            for i in range(b)
        ])
        expected = merged + blk.mlp(blk.ln_2(merged))
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(rec["out"], expected, rtol=1e-4, atol=1e-4)
    assert model._atc_info["tokens"] == [14, 10, 10]


def test_trace_source_and_errors():
    model = _make()
    atc.patch.swag(model, method="atc", trace_source=True)
    model.r = (2, "constant")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    info = model._atc_info
    assert info["tokens"] == [15, 13, 11]
    counts = torch.bincount(info["token_map"][0], minlength=11).float()
    torch.testing.assert_close(counts, info["size"][0, :, 0])
    with pytest.raises(ValueError, match="already patched"):
        atc.patch.swag(model)
    with pytest.raises(TypeError, match="VisionTransformer"):
        atc.patch.swag(torch.nn.Linear(2, 2))


def test_layers_share_one_patched_class_and_r0_runs_the_unpatched_operators():
    model, other = _make(), _make()
    x = torch.randn(1, 3, 64, 64)

    class OpLog(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with OpLog() as ref:
            model(x)
        atc.patch.swag(model, method="tome")
        atc.patch.swag(other, method="atc")
        with OpLog() as patched:
            model(x)
    assert patched.ops == ref.ops
    classes = {type(blk) for m in (model, other) for blk in m.encoder.layers}
    assert len(classes) == 1 and issubclass(classes.pop(), EncoderBlock)
    atc.patch.remove(model)
    assert type(model.encoder.layers[0]) is EncoderBlock and type(other.encoder.layers[0]) is not EncoderBlock
