"""atc.patch.timm on SigLIP-style attention pooling (``global_pool='map'``) and timm's RoPE ViTs (AttentionRope).

For each family and ATC (every linkage) / ToMe: r = 0 equals the unpatched model, a merged block equals a
brute-force loop (tests/_vit_reference.py), token counts drop by r per block, remove restores the model, and
unsupported options fail naming the option.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import AttentionRope
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
from timm.models.vision_transformer import VisionTransformer

import atc.patch
from _vit_reference import METHODS, attention, capture, in_patch_order, merge_loop, randomize

TINY = dict(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5)

FAMILIES = {
    "siglip_map": lambda: VisionTransformer(**TINY, class_token=False, global_pool="map", fc_norm=False),
    "map_with_cls": lambda: VisionTransformer(**TINY, global_pool="map", reg_tokens=1),
    "rope_vit": lambda: Eva(**TINY, attn_type="rope", use_abs_pos_emb=False, use_rot_pos_emb=True,
                            init_values=0.5, rope_grid_indexing="xy", rope_temperature=100.0),
    "rope_gqa": lambda: Eva(**TINY, attn_type="rope", qkv_fused=False, num_kv_heads=1, use_rot_pos_emb=True,
                            num_reg_tokens=2, init_values=0.5),
}


def _make(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(FAMILIES[family]())


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,linkage", METHODS)
def test_r0_equals_unpatched_and_remove_restores(family, method, linkage):
    model = _make(family)
    classes = [type(m) for m in model.modules()]
    x = _images()
    with torch.no_grad():
        ref = model(x)
        atc.patch.timm(model, method=method, linkage=linkage)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        model.r = 2
        model(x)
        t0 = 16 + model.num_prefix_tokens
        assert model._atc_info["tokens"] == [t0 - 2 * (i + 1) for i in range(3)]
    atc.patch.remove(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_atc") for m in model.modules() for k in m.__dict__)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def _ref_rope_block(blk, x, size, rope, method, r, prefix, linkage):
    """One AttentionRope EvaBlock, brute force (explicit projections, rotary, repeated K/V heads, softmax)."""
    attn = blk.attn
    h_in = blk.norm1(x)
    b, n, _ = h_in.shape
    if attn.qkv is not None:
        q, k, v = attn.qkv(h_in).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(h_in).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h_in).reshape(b, n, attn.num_kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(h_in).reshape(b, n, attn.num_kv_heads, -1).transpose(1, 2)
    q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope)], dim=2)
    k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope)], dim=2)
    rep = attn.num_heads // k.shape[1]
    k = torch.cat([k[:, [h]].expand(-1, rep, -1, -1) for h in range(k.shape[1])], dim=1)
    v = torch.cat([v[:, [h]].expand(-1, rep, -1, -1) for h in range(v.shape[1])], dim=1)
    x = x + blk.gamma_1 * attn.proj(attention(q, k, v, size, attn.head_dim ** -0.5))
    x, size, cls = merge_loop(x, size, k.mean(1), method, r, prefix, linkage)
    return x + blk.gamma_2 * blk.mlp(blk.norm2(x)), cls


@pytest.mark.parametrize("family", ["rope_vit", "rope_gqa"])
@pytest.mark.parametrize("method,linkage", METHODS)
def test_rope_merged_block_matches_brute_force(family, method, linkage):
    """Block 1 (after a merge in block 0: sizes, proportional attention and merged rotary tables matter)."""
    model = _make(family)
    prefix = model.num_prefix_tokens
    atc.patch.timm(model, method=method, linkage=linkage, trace_source=True)
    model.r = [3, 4, 0]
    rec, hooks = capture(model.blocks[1], lambda: model._atc_state)
    with torch.no_grad():
        model(_images())
        # the rotary table of a merged token: the mean of its patches' rows (sizes are 1 before block 0)
        full = model.rope.get_embed()
        tm = rec["token_map"][:, prefix:]
        rope = torch.stack([
            torch.stack([full[tm[b] == s].mean(0) for s in range(prefix, rec["x"].shape[1])]) for b in range(2)
        ]).unsqueeze(1)
        expected, cls = _ref_rope_block(model.blocks[1], rec["x"], rec["size"], rope, method, 4, prefix, linkage)
        expected = in_patch_order(expected, cls, rec["token_map"], rec["token_map_out"])
    for h in hooks:
        h.remove()
    assert rec["out"].shape == expected.shape
    torch.testing.assert_close(rec["out"], expected, rtol=1e-4, atol=1e-4)


def _ref_attention_pool(pool, x, size):
    """timm's AttentionPoolLatent over merged tokens, brute force: each key weighted by its size."""
    b, n, c = x.shape
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
    out = torch.zeros(b, q.shape[2], pool.num_heads, pool.head_dim)
    for bi in range(b):
        for h in range(pool.num_heads):
            for qi in range(q.shape[2]):
                w = torch.stack([size[bi, j, 0] * torch.exp(q[bi, h, qi] @ k[bi, h, j] * pool.scale) for j in range(n)])
                out[bi, qi, h] = (w[:, None] * v[bi, h]).sum(0) / w.sum()
    y = pool.proj(out.reshape(b, -1, c))
    y = y + pool.mlp(pool.norm(y))
    return y[:, 0] if pool.pool == "token" else y.mean(1)


@pytest.mark.parametrize("family", ["siglip_map", "map_with_cls"])
@pytest.mark.parametrize("method,linkage", METHODS)
def test_attention_pool_is_size_weighted(family, method, linkage):
    """The pooled output over merged tokens equals (1) a brute-force pool weighting each key by its size and
    (2) the unpatched head on the merged tokens unmerged to every patch (a merged token stands for its
    patches)."""
    model = _make(family)
    prefix = model.num_prefix_tokens
    atc.patch.timm(model, method=method, linkage=linkage, trace_source=True)
    model.r = 3
    x = _images()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        info = model._atc_info
        assert feats.shape[1] == prefix + 16 - 9
        pooled = model.forward_head(feats, pre_logits=True)
        expected = _ref_attention_pool(model.attn_pool, feats[:, prefix:], info["size"][:, prefix:])
        torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
        full = feats.gather(1, info["token_map"].unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        unpatched = VisionTransformer.forward_head(model, full)  # timm's own pooling over all tokens
    torch.testing.assert_close(logits, unpatched, rtol=1e-4, atol=1e-5)


def test_attention_pool_without_merging_runs_timm_pool():
    model = _make("siglip_map")
    atc.patch.timm(model, method="tome", proportional_attn=False)
    model.r = [0, 0, 0]
    with torch.no_grad():
        model(_images())
    assert model._atc_info["size"] is None


def test_unsupported_options_name_the_option():
    with pytest.raises(ValueError, match="global_pool='prr'"):
        atc.patch.timm(VisionTransformer(**TINY, class_token=False, global_pool="prr"))
    with pytest.raises(ValueError, match="pos_embed='abs'"):
        model = VisionTransformer(**TINY, class_token=False, global_pool="map")
        model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(16, 32))
        atc.patch.timm(model)
    with pytest.raises(ValueError, match="rope_type='mixed'"):
        atc.patch.timm(Eva(**TINY, attn_type="rope", use_rot_pos_emb=True, rope_type="mixed"))
    with pytest.raises(ValueError, match="NaFlexVit with rope_type='mixed'"):  # NaFlexVit: tests/test_patch_padding.py
        atc.patch.timm(NaFlexVit(NaFlexVitCfg(embed_dim=32, depth=1, num_heads=2, rope_type="mixed"), num_classes=3))


def test_rope_blocks_share_one_patched_class():
    model = _make("rope_vit")
    atc.patch.timm(model, method="tome")
    assert len({type(b) for b in model.blocks}) == 1
    assert type(model.blocks[0].attn) is AttentionRope
