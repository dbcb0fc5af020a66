"""atc.patch.transformers on Hugging Face vision towers (ViT, CLIP, SigLIP, DINOv2), tiny random configs.

For each family and ATC (every linkage) / ToMe: r = 0 equals the unpatched model, a merged layer equals a
brute-force loop (tests/_vit_reference.py), token counts drop by r per layer, remove restores the model, SigLIP's
pooled output equals a brute-force size-weighted attention pool, and unsupported options fail naming the option.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import atc.patch  # noqa: E402
from _vit_reference import METHODS, attention, capture, in_patch_order, merge_loop, randomize  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)


def _clip_model():
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.CLIPModel(transformers.CLIPConfig(vision_config=SMALL, text_config=text, projection_dim=16))


FAMILIES = {
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**SMALL)),
    "vit_cls": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=3)),
    "clip_vision": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)),
    "clip": _clip_model,
    "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL)),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**SMALL)),
    "dinov2_reg": lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)),
}

#: family -> (vision tower attribute or "", its layer list, prefix tokens, part names of a layer)
LAYOUT = {
    "vit": ("", "layers", 1, ("layernorm_before", "attention", "o_proj", "layernorm_after", None, None)),
    "vit_cls": ("vit", "layers", 1, ("layernorm_before", "attention", "o_proj", "layernorm_after", None, None)),
    "clip_vision": ("", "encoder.layers", 1, ("layer_norm1", "self_attn", "out_proj", "layer_norm2", None, None)),
    "clip": ("vision_model", "encoder.layers", 1, ("layer_norm1", "self_attn", "out_proj", "layer_norm2", None, None)),
    "siglip": ("", "encoder.layers", 0, ("layer_norm1", "self_attn", "out_proj", "layer_norm2", None, None)),
    "dinov2": ("", "encoder.layer", 1, ("norm1", "attention", "o_proj", "norm2", "layer_scale1", "layer_scale2")),
    "dinov2_reg": ("", "encoder.layer", 3, ("norm1", "attention", "o_proj", "norm2", "layer_scale1",
                                            "layer_scale2")),
}


def _make(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(FAMILIES[family]())


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _run(model, family, x):
    """The family's main output: logits, image features, or pooled + last hidden state."""
    if family == "clip":
        return model.get_image_features(pixel_values=x).pooler_output
    out = model(pixel_values=x)
    if getattr(out, "logits", None) is not None:
        return out.logits
    pooled = out.pooler_output
    return torch.cat([pooled.flatten(1), out.last_hidden_state.flatten(1)], dim=1)


def _path(module, path):
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def _layers(model, family):
    tower, path, _, _ = LAYOUT[family]
    return list(_path(_path(model, tower), path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,linkage", METHODS + [("kmedoids", "average"), ("dpcknn", "average")])
def test_r0_equals_unpatched_token_counts_and_remove(family, method, linkage):
    model = _make(family)
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images()
    with torch.no_grad():
        ref = _run(model, family, x)
        atc.patch.transformers(model, method=method, linkage=linkage)
        torch.testing.assert_close(_run(model, family, x), ref, rtol=0, atol=0)
        model.r = 2
        _run(model, family, x)
        t0 = 16 + LAYOUT[family][2]
        assert model._atc_info["tokens"] == [t0 - 2 * (i + 1) for i in range(3)]
    atc.patch.remove(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_atc") for m in model.modules() for k in m.__dict__)
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        torch.testing.assert_close(_run(model, family, x), ref, rtol=0, atol=0)


def _ref_layer(layer, names, x, size, method, r, prefix, linkage):
    """One encoder layer, brute force: explicit projections and softmax, merge loop, MLP."""
    norm1, attn_name, out_name, norm2, ls1, ls2 = names
    attn = getattr(layer, attn_name)
    h = getattr(layer, norm1)(x)
    b, n, _ = h.shape
    q, k, v = (proj(h).reshape(b, n, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    h = getattr(attn, out_name)(attention(q, k, v, size, attn.head_dim ** -0.5))
    x = x + (getattr(layer, ls1)(h) if ls1 else h)
    x, size, cls = merge_loop(x, size, k.mean(1), method, r, prefix, linkage)
    h = layer.mlp(getattr(layer, norm2)(x))
    return x + (getattr(layer, ls2)(h) if ls2 else h), cls


@pytest.mark.parametrize("family", ["vit", "clip_vision", "siglip", "dinov2", "dinov2_reg"])
@pytest.mark.parametrize("method,linkage", METHODS)
def test_merged_layer_matches_brute_force(family, method, linkage):
    """Layer 1 (after a merge in layer 0, so sizes and proportional attention matter) against the reference."""
    model = _make(family)
    prefix, names = LAYOUT[family][2], LAYOUT[family][3]
    atc.patch.transformers(model, method=method, linkage=linkage, trace_source=True)
    model.r = [3, 4, 0]
    layer = _layers(model, family)[1]
    rec, hooks = capture(layer, lambda: model._atc_state)
    with torch.no_grad():
        _run(model, family, _images())
        expected, cls = _ref_layer(layer, names, rec["x"], rec["size"], method, 4, prefix, linkage)
        expected = in_patch_order(expected, cls, rec["token_map"], rec["token_map_out"])
    for h in hooks:
        h.remove()
    assert rec["out"].shape == expected.shape
    torch.testing.assert_close(rec["out"], expected, rtol=1e-4, atol=1e-4)


def _ref_siglip_pool(head, x, size):
    """SigLIP's attention-pooling head over merged tokens, brute force: each key weighted by its size."""
    mha = head.attention
    c, heads = x.shape[-1], mha.num_heads
    d = c // heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q = head.probe[0, 0] @ wq.T + bq
    out = []
    for b in range(x.shape[0]):
        k, v = x[b] @ wk.T + bk, x[b] @ wv.T + bv
        per_head = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            w = torch.stack([size[b, j, 0] * torch.exp(q[sl] @ k[j, sl] / d ** 0.5) for j in range(x.shape[1])])
            per_head.append((w[:, None] * v[:, sl]).sum(0) / w.sum())
        out.append(mha.out_proj(torch.cat(per_head)))
    y = torch.stack(out)
    return y + head.mlp(head.layernorm(y))


@pytest.mark.parametrize("method,linkage", METHODS)
def test_siglip_pool_is_size_weighted_attention_pool(method, linkage):
    model = _make("siglip")
    atc.patch.transformers(model, method=method, linkage=linkage, trace_source=True)
    model.r = 3
    with torch.no_grad():
        out = model(pixel_values=_images())
        size = model._atc_info["size"]
        assert out.last_hidden_state.shape[1] == 16 - 9 == size.shape[1]
        expected = _ref_siglip_pool(model.head, out.last_hidden_state, size)
        torch.testing.assert_close(out.pooler_output, expected, rtol=1e-4, atol=1e-5)
        # unmerged to every patch, the unpatched head gives the same pooled output
        full = out.last_hidden_state.gather(1, model._atc_info["token_map"].unsqueeze(-1).expand(-1, -1, 32))
        unpatched = type(model.head).__mro__[1].forward(model.head, full)
    torch.testing.assert_close(out.pooler_output, unpatched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_hidden_states_follow_token_counts_and_blocks_share_a_class(family):
    """Recorded by transformers' hooks on the tower (ViT: the patched model class itself) or its encoder."""
    model = _make(family)
    atc.patch.transformers(model, method="tome")
    model.r = 2
    with torch.no_grad():
        out = model(pixel_values=_images(), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 15, 13, 11]
    assert len({type(layer) for layer in _layers(model, family)}) == 1


def test_clip_text_tower_is_untouched():
    model = _make("clip")
    text_classes = [type(m) for m in model.text_model.modules()]
    atc.patch.transformers(model, method="atc")
    model.r = 2
    assert [type(m) for m in model.text_model.modules()] == text_classes
    ids = torch.tensor([[0, 5, 6, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=_images(1))
    assert out.logits_per_image.shape == (1, 1)
    assert model._atc_info["tokens"] == [15, 13, 11]


def test_unsupported_options_name_the_option():
    model = _make("vit")
    atc.patch.transformers(model, method="tome")
    model.r = 2
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(pixel_values=_images(), output_attentions=True)
    # a mask of token pairs (here causal) is no padding mask: merged tokens cannot follow it (padding masks are
    # supported: tests/test_patch_padding.py)
    causal = torch.ones(17, 17, dtype=torch.bool).tril().expand(2, 1, 17, 17)
    with pytest.raises(ValueError, match="not a key-padding mask"):
        model(pixel_values=_images(), attention_mask=causal)
    cls_masked = torch.ones(2, 17, dtype=torch.bool)
    cls_masked[:, 0] = False
    with pytest.raises(ValueError, match="class or register token"):
        model(pixel_values=_images(), attention_mask=cls_masked)
    model.r = 0  # nothing merged: the layers' own forwards run, output_attentions as transformers handles it
    with torch.no_grad():
        model(pixel_values=_images(), output_attentions=True)
        model(pixel_values=_images(), attention_mask=causal)
    model.r = 2
    with pytest.raises(ValueError, match="already patched"):
        atc.patch.transformers(model)
    with pytest.raises(TypeError, match="disagree"):  # ToMe's prop_attn spelling must agree with ours
        atc.patch.transformers(_make("vit"), proportional_attn=True, prop_attn=False)
    assert not atc.patch.transformers(_make("vit"), prop_attn=False)._atc_state.proportional_attn
    with pytest.raises(ValueError, match="Dinov2ForImageClassification"):
        atc.patch.transformers(transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**SMALL)))
    with pytest.raises(TypeError, match="supports ViTModel"):
        atc.patch.transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="linkage"):
        atc.patch.transformers(_make("vit"), linkage="ward")
