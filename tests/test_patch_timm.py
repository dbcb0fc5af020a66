"""atc.patch.timm on today's timm ViTs: r=0 identity, a brute-force merged block, schedules, pooling, errors.

The brute-force reference below is written independently of atc.merge/atc.cluster: attention with an
explicit softmax, ATC clusters from scikit-learn, ToMe matching with Python loops, merging by looping over
clusters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock, VisionTransformer

import atc.patch
from atc.patch.common import parse_r

from _vit_reference import OpLog, clusters

TINY = dict(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5)

FAMILIES = {
    "deit": lambda: VisionTransformer(**TINY),
    "deit3_layerscale": lambda: VisionTransformer(**TINY, init_values=0.5, no_embed_class=True, qkv_bias=False),
    "register_tokens": lambda: VisionTransformer(**TINY, reg_tokens=4, no_embed_class=True, init_values=0.5),
    "qk_norm": lambda: VisionTransformer(**TINY, qk_norm=True),
    "avgpool_no_cls": lambda: VisionTransformer(**TINY, class_token=False, global_pool="avg", fc_norm=True),
    "eva_rope": lambda: Eva(**TINY, use_rot_pos_emb=True, ref_feat_shape=(4, 4), init_values=0.5),
    "post_norm": lambda: VisionTransformer(**TINY, block_fn=__import__(
        "timm.models.vision_transformer", fromlist=["ResPostBlock"]).ResPostBlock),
}


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves biases, pos-embeds and norms trivial; perturb everything so each term matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    for m in model.modules():
        if hasattr(m, "k_bias") and m.k_bias is not None:  # EVA: non-persistent zero k-bias stays zero
            m.k_bias.zero_()
    return model.eval()


def _make(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomize(FAMILIES[family]())


# ---------------------------------------------------------------------------------------------- reference
def _ref_attention(blk, x, size, rope, prefix, eva):
    attn = blk.attn
    b, n, c = x.shape
    if eva:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
    else:
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    qkv = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    if rope is not None:
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope)], dim=2)
    logits = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5 + size.log()[:, None, None, :, 0]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(attn.norm(out)), k.mean(1)


def _ref_block(blk, x, size, rope, method, r, prefix, linkage, eva):
    """One merged block, brute force: returns (output (B, T-r, C), new sizes (B, T-r, 1))."""
    h, metric = _ref_attention(blk, blk.norm1(x), size, rope, prefix, eva)
    h = blk.gamma_1 * h if eva else blk.ls1(h)
    x = x + h
    outs, sizes = [], []
    for bi in range(x.shape[0]):
        rows, srows = [], []
        for cl in clusters(metric[bi], method, r, prefix, linkage):
            w = size[bi, cl]
            rows.append((x[bi, cl] * w).sum(0) / w.sum())
            srows.append(w.sum(0))
        outs.append(torch.stack(rows))
        sizes.append(torch.stack(srows))
    x, size = torch.stack(outs), torch.stack(sizes)
    h = blk.mlp(blk.norm2(x))
    h = blk.gamma_2 * h if eva else blk.ls2(h)
    return x + h, size


def _capture(model, index):
    """Forward hooks recording block ``index``'s input/output and the merge state before it."""
    rec = {}
    blk = model.blocks[index]

    def pre(_m, args, kwargs):
        state = model._atc_state
        rec["x"] = args[0].detach().clone()
        rec["size"] = None if state.size is None else state.size.clone()
        rec["token_map"] = None if state.token_map is None else state.token_map.clone()
        rec["rope"] = kwargs.get("rope")

    hooks = [blk.register_forward_pre_hook(pre, with_kwargs=True),
             blk.register_forward_hook(lambda _m, _a, out: rec.__setitem__("out", out.detach().clone()))]
    return rec, hooks


# -------------------------------------------------------------------------------------------------- tests
R0_CASES = [(f, m) for f in FAMILIES for m in ("atc", "tome")] + [
    (f, m) for f in ("deit", "eva_rope") for m in ("kmedoids", "dpcknn")]


@pytest.mark.parametrize("family,method", R0_CASES)
def test_r0_equals_unpatched(family, method):
    model = _make(family)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        atc.patch.timm(model, method=method)
        model.r = 0
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    atc.patch.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "post_norm"])
@pytest.mark.parametrize("method,linkage", [("atc", "average"), ("atc", "complete"), ("tome", None)])
def test_merged_block_matches_brute_force(family, method, linkage):
    """Block 1 (after a merge in block 0, so sizes and proportional attention matter) against the reference."""
    model = _make(family)
    eva = isinstance(model, Eva)
    prefix = model.num_prefix_tokens
    # the reference lists clusters in spatial order; ToMe's published layout is checked in test_fidelity.py
    atc.patch.timm(model, method=method, linkage=linkage or "average", trace_source=True, layout="spatial")
    model.r = [3, 4, 0]
    rec, hooks = _capture(model, 1)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        rope = None
        if eva:
            # block 1's rotary table = size-weighted mean (sizes are 1 before block 0) of the merged patches'
            full = model.rope.get_embed()
            tm = rec["token_map"][:, prefix:]
            n_out = rec["x"].shape[1]
            rope = torch.stack([
                torch.stack([full[tm[b] == s].mean(0) if (tm[b] == s).any() else torch.zeros_like(full[0])
                             for s in range(prefix, n_out)])
                for b in range(2)
            ]).unsqueeze(1)
        expected, _ = _ref_block(model.blocks[1], rec["x"], rec["size"], rope, method, 4, prefix,
                                 linkage or "average", eva)
    for h in hooks:
        h.remove()
    assert rec["out"].shape == expected.shape
    torch.testing.assert_close(rec["out"], expected, rtol=1e-4, atol=1e-4)


def test_post_norm_block_brute_force():
    """ResPostBlock: norm after attention/MLP; checked on block 0 with ToMe."""
    model = _make("post_norm")
    atc.patch.timm(model, method="tome", layout="spatial")  # the reference lists clusters in spatial order
    model.r = [3, 0, 0]
    rec, hooks = _capture(model, 0)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        blk, x = model.blocks[0], rec["x"]
        size = torch.ones(2, x.shape[1], 1)
        attn_out, metric = _ref_attention(blk, x, size, None, 1, False)
        x1 = x + blk.norm1(attn_out)
        merged = torch.stack([torch.stack([x1[b, cl].mean(0) for cl in clusters(metric[b], "tome", 3, 1, "")])
                              for b in range(2)])
        expected = merged + blk.norm2(blk.mlp(merged))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(rec["out"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_r8_token_counts(method):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2, num_classes=3).eval()
    atc.patch.timm(model, method=method)
    model.r = 8
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert model._atc_info["tokens"] == [197 - 8 * (i + 1) for i in range(12)]


def test_schedules():
    assert parse_r((16, "decrease"), 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r((5, "constant"), 4) == [5, 5, 5, 5]
    assert parse_r([1, 2, 3], 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="3 blocks"):
        parse_r([1, 2], 3)
    with pytest.raises(ValueError, match="schedule"):
        parse_r((4, "increase"), 3)


def test_avg_pool_is_size_weighted_and_normed_once():
    """Unmerging the final tokens to the patch grid and pooling with the unpatched head gives the same logits."""
    model = _make("avgpool_no_cls")
    atc.patch.timm(model, method="atc", trace_source=True)
    model.r = 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        token_map = model._atc_info["token_map"]
        full = feats.gather(1, token_map.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        expected = VisionTransformer.forward_head(model, full)  # plain mean + fc_norm, as unpatched timm
    assert feats.shape[1] == 16 - 9
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_tome_cap_warns_once_with_reached_counts():
    model = _make("deit")
    atc.patch.timm(model, method="tome")
    model.r = 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
            model(torch.randn(1, 3, 64, 64))
    msgs = [str(w.message) for w in caught if "cannot remove" in str(w.message)]
    assert len(msgs) == 1
    assert model._atc_info["tokens"] == [9, 5, 3]  # 16 patches halve each block (CLS kept)
    assert "[9, 5, 3]" in msgs[0]


def test_dynamic_img_size_and_remove_restores_classes():
    torch.manual_seed(0)
    model = VisionTransformer(**TINY, dynamic_img_size=True).eval()
    classes = [type(m) for m in model.modules()]
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        ref = model(x)
        atc.patch.timm(model, method="atc")
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        model.r = 2
        model(x)
    assert model._atc_info["tokens"] == [1 + 30 - 2, 1 + 30 - 4, 1 + 30 - 6]
    atc.patch.remove(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_atc") for m in model.modules() for k in m.__dict__)


def test_source_tracking_partitions_patches():
    model = _make("register_tokens")
    atc.patch.timm(model, method="atc", trace_source=True)
    model.r = 3
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    info = model._atc_info
    tm, size = info["token_map"], info["size"]
    assert tm.shape == (2, 21) and (tm[:, :5] == torch.arange(5)).all()
    counts = torch.stack([torch.bincount(tm[b], minlength=size.shape[1]) for b in range(2)])
    torch.testing.assert_close(counts.float(), size[..., 0])


@pytest.mark.parametrize("metric", ["queries", "values", "x"])
def test_metric_option(metric):
    model = _make("deit")
    atc.patch.timm(model, method="atc", metric=metric)
    model.r = 2
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert model._atc_info["tokens"] == [15, 13, 11]


def test_unsupported_options_fail_at_patch_time():
    with pytest.raises(ValueError, match="global_pool='prr'"):  # 'map' is supported: tests/test_patch_timm_families.py
        atc.patch.timm(VisionTransformer(**TINY, class_token=False, global_pool="prr"))
    with pytest.raises(ValueError, match="ParallelScalingBlock"):
        atc.patch.timm(VisionTransformer(**TINY, block_fn=ParallelScalingBlock))
    with pytest.raises(ValueError, match="linkage"):
        atc.patch.timm(VisionTransformer(**TINY), linkage="ward")
    with pytest.raises(ValueError, match="merge method"):
        atc.patch.timm(VisionTransformer(**TINY), method="random")
    with pytest.raises(TypeError, match="torchvision"):
        atc.patch.timm(torch.nn.Linear(2, 2))


def test_blocks_share_one_patched_class_and_r_is_checked_when_set():
    """One patched class per original class (torch.compile guards on types), shared across models too."""
    first, second, post = _make("deit"), _make("deit"), _make("post_norm")
    for model in (first, second, post):
        atc.patch.timm(model, method="tome")
    assert len({type(b) for b in first.blocks} | {type(b) for b in second.blocks}) == 1
    assert type(first) is type(second)
    assert type(post.blocks[0]) is not type(first.blocks[0])
    assert isinstance(post.blocks[0], ResPostBlock) and isinstance(first.blocks[0], Block)
    assert type(first.blocks[0].attn) is Attention  # attention runs unpatched code where nothing merges
    with pytest.raises(ValueError, match="3 blocks"):
        first.r = [1, 2]
    with pytest.raises(TypeError, match="model.r"):
        first.r = "16"
    assert first.r == 0
    atc.patch.remove(first)
    assert type(first) is VisionTransformer and type(first.blocks[0]) is Block
    assert type(second.blocks[0]) is not Block  # removing one model's patch leaves the other patched


@pytest.mark.parametrize("family", ["deit", "eva_rope"])
def test_r0_runs_exactly_the_unpatched_operators(family):
    """With r = 0 nothing of the patch runs on tensors: no extra kernel over the unpatched model."""
    model = _make(family)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with OpLog() as ref:
            model(x)
        atc.patch.timm(model, method="atc", trace_source=False)
        with OpLog() as patched:
            model(x)
    assert patched.ops == ref.ops


def test_tome_spelling_prop_attn_is_proportional_attn():
    """ToMe's ``prop_attn=`` is accepted as ``proportional_attn=``: the same model either way; conflicting values
    raise instead of one silently winning."""
    x = torch.randn(2, 3, 64, 64)
    out = {}
    for key, value in [("proportional_attn", True), ("prop_attn", True), ("proportional_attn", False),
                       ("prop_attn", False), (None, None)]:
        model = _make("deit")
        atc.patch.timm(model, method="tome", **({key: value} if key else {}))
        model.r = 4
        with torch.no_grad():
            out[key, value] = model(x)
        if key:
            assert model._atc_state.proportional_attn is value
    torch.testing.assert_close(out["prop_attn", True], out["proportional_attn", True], rtol=0, atol=0)
    torch.testing.assert_close(out["prop_attn", False], out["proportional_attn", False], rtol=0, atol=0)
    torch.testing.assert_close(out[None, None], out["proportional_attn", True], rtol=0, atol=0)  # default on
    assert (out["proportional_attn", True] - out["proportional_attn", False]).abs().max() > 1e-4  # it matters
    atc.patch.timm(_make("deit"), proportional_attn=False, prop_attn=False)  # agreeing values are fine
    with pytest.raises(TypeError, match="prop_attn is ToMe's name for proportional_attn"):
        atc.patch.timm(_make("deit"), proportional_attn=True, prop_attn=False)
