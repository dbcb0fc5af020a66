"""atc.patch.swag on torchvision's VisionTransformer: r=0 identity, brute-force merged block, counts, remove."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

import atc.patch

from _vit_reference import OpLog, clusters


def _make() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


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
                         for cl in clusters(metric[i], method, 4, 1, linkage)])
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
    with pytest.raises(TypeError, match="disagree"):  # ToMe's prop_attn spelling must agree with ours
        atc.patch.swag(_make(), proportional_attn=False, prop_attn=True)
    assert not atc.patch.swag(_make(), prop_attn=False)._atc_state.proportional_attn


def test_layers_share_one_patched_class_and_r0_runs_the_unpatched_operators():
    model, other = _make(), _make()
    x = torch.randn(1, 3, 64, 64)

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
