"""The baselines compute what the published code computes: brute-force re-implementations of the published
ToMe step (official ToMe / the paper's models), K-Medoids and DPC-KNN models, chained through whole models with
random weights, against the patched timm ViTs and the registered ``tome_*``/``kmedoids_*``/``dpcknn_*`` models.

The references are written from the published algorithms' descriptions, one sample and one token at a time
(Python loops and sorts), sharing nothing with ``atc.merge``.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import atc.merge
import atc.models  # noqa: F401  (registers the models)
import atc.patch

TINY = dict(embed_dim=32, depth=12, num_heads=2, img_size=128)  # 64 patch tokens
ATOL = 2e-5


# --------------------------------------------------------------------------------------------------- references
def ref_attention(blk, x, size=None):
    """timm's attention written out: softmax(q kᵀ·scale + log size) v; returns (out, keys over heads, attn)."""
    attn = blk.attn
    b, n, c = x.shape
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    a = logits.softmax(dim=-1)
    out = (a @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, attn.proj.weight, attn.proj.bias), k.mean(1), a


def ref_tome_step(x, size, metric, r, class_token, distill_token, source=None):
    """One published ToMe merge of one sample: x (T, C), size (T, 1), metric (T, C'); ``source (T, N)``: which
    original tokens each token holds (merged with the tokens, as ToMe's source tracking)."""
    t = x.shape[0]
    r = min(r, (t - class_token - distill_token) // 2)
    if r <= 0:
        return x, size, source
    m = metric / metric.norm(dim=-1, keepdim=True)
    src_pos, dst_pos = list(range(0, t, 2)), list(range(1, t, 2))
    best = []  # (score, destination index) per source
    for i, a in enumerate(src_pos):
        scores = [float(m[a] @ m[b]) for b in dst_pos]
        if class_token and i == 0:
            scores = [-math.inf] * len(dst_pos)
        if distill_token:
            scores[0] = -math.inf
        j = max(range(len(dst_pos)), key=lambda jj: scores[jj])  # the first maximum
        best.append((scores[j], j))
    order = sorted(range(len(src_pos)), key=lambda i: -best[i][0])  # stable: equal scores keep source order
    merged, unmerged = order[:r], order[r:]
    if class_token:
        unmerged = sorted(unmerged)
    if source is None:
        source = torch.zeros(t, 1)
    sums = [[x[b] * size[b], size[b].clone(), source[b].clone()] for b in dst_pos]
    for i in merged:
        a, j = src_pos[i], best[i][1]
        sums[j][0] = sums[j][0] + x[a] * size[a]
        sums[j][1] = sums[j][1] + size[a]
        sums[j][2] = torch.maximum(sums[j][2], source[a])
    unm = [(x[src_pos[i]], size[src_pos[i]], source[src_pos[i]]) for i in unmerged]
    dst = [(s / w, w, src) for s, w, src in sums]
    out = unm[:1] + dst[:1] + unm[1:] + dst[1:] if distill_token else unm + dst
    return tuple(torch.stack([o[k] for o in out]) for k in range(3))


def ref_kmedoids(x, k, weights, iters):
    """The published K-Medoids step on one sample: x (n, C), weights (n,) -> the k medoid tokens, in order."""
    n = x.shape[0]
    d = [[float(v) for v in row] for row in torch.cdist(x[None].double(), x[None].double())[0]]
    w = [float(v) for v in weights]
    medoids = sorted(range(n), key=lambda i: -w[i])[:k]
    row_cost = [w[i] * sum(d[i]) for i in range(n)]
    for _ in range(iters):
        assign = [min(range(k), key=lambda c: d[i][medoids[c]]) for i in range(n)]
        for c in range(k):
            members = [i for i in range(n) if assign[i] == c]
            medoids[c] = min(members, key=lambda i: row_cost[i]) if members else 0
    return x[medoids]


def ref_dpc_knn(x, k_clusters, score_layer, k_nn=5):
    """The published DPC-KNN step (TCFormer's CTM) on one sample, with our deterministic density tie-break."""
    n, c = x.shape
    dist = torch.cdist(x[None], x[None])[0] / c**0.5
    d = [[float(v) for v in row] for row in dist]
    density = [math.exp(-sum(v * v for v in sorted(d[i])[:k_nn]) / k_nn) + 1e-6 * (n - 1 - i) / n for i in range(n)]
    dmax = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(n) if density[j] > density[i]], default=dmax) for i in range(n)]
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:k_clusters]
    assign = [min(range(k_clusters), key=lambda cc: d[centres[cc]][j]) for j in range(n)]
    for cc, i in enumerate(centres):
        assign[i] = cc
    w = score_layer(x).exp()  # (n, 1)
    out = []
    for cc in range(k_clusters):
        idx = [j for j in range(n) if assign[j] == cc]
        out.append((w[idx] * x[idx]).sum(0) / (w[idx].sum(0) + 1e-6))
    return torch.stack(out)


def ref_embed(model, img):
    return model.norm_pre(model._pos_embed(model.patch_embed(img)))


def ref_head(model, x, size):
    """Final norm, pooling (class token, distillation average, or size-weighted average) and head."""
    x = model.norm(x)
    if getattr(model, "head_dist", None) is not None:
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    if model.global_pool == "avg":
        p = model.num_prefix_tokens
        w = torch.ones_like(x[:, p:, :1]) if size is None else size[:, p:]
        return model.head(model.fc_norm((x[:, p:] * w).sum(1) / w.sum(1)))
    return model.head(model.fc_norm(x[:, 0]))


def ref_tome_model(model, img, r_per_block, return_source=False):
    """A timm ViT with the published ToMe in every block (proportional attention, keys as metric)."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x, size = ref_embed(model, img), None
    source = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
    for blk, r in zip(model.blocks, r_per_block):
        h, metric, _ = ref_attention(blk, blk.norm1(x), size)
        x = x + h
        if r > 0:
            s = torch.ones_like(x[..., :1]) if size is None else size
            out = [ref_tome_step(x[b], s[b], metric[b], r, class_token, distill_token, source[b])
                   for b in range(x.shape[0])]
            x, size, source = (torch.stack([o[k] for o in out]) for k in range(3))
        x = x + blk.mlp(blk.norm2(x))
    logits = ref_head(model, x, size)
    return (logits, source) if return_source else logits


def ref_clustering_model(model, img, kept, method, iters=3):
    """The published K-Medoids / DPC-KNN models: plain blocks, reduction of the patch tokens before the
    reduction blocks (K-Medoids weighted by the attention received in the previous block)."""
    p, locs = model.num_prefix_tokens, model.keep_schedule.reduction_loc
    x, attn = ref_embed(model, img), None
    for i, blk in enumerate(model.blocks):
        if i in locs:
            k = kept[locs.index(i)]
            if method == "kmedoids":
                weights = attn.sum(1).sum(1)[:, p:]
                reduced = [ref_kmedoids(x[b, p:], k, weights[b], iters) for b in range(x.shape[0])]
            else:
                score = model.cluster_layers[locs.index(i)].score
                reduced = [ref_dpc_knn(x[b, p:], k, score) for b in range(x.shape[0])]
            x = torch.cat([x[:, :p], torch.stack(reduced)], dim=1)
        h, _, attn = ref_attention(blk, blk.norm1(x))
        x = x + h
        x = x + blk.mlp(blk.norm2(x))
    return ref_head(model, x, None)


def _images(seed, size=128, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------------------- ToMe
@pytest.mark.filterwarnings("ignore:tome cannot remove")
@pytest.mark.parametrize("distilled", [False, True])
def test_tome_patched_deit_r8_every_block(distilled):
    torch.manual_seed(0)
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    model = cls(img_size=64, patch_size=8, embed_dim=48, depth=8, num_heads=3, num_classes=10).eval()
    atc.patch.timm(model, method="tome")
    model.r = 8
    img = _images(1, 64)
    with torch.no_grad():
        out = model(img)
        ref = ref_tome_model(model, img, [8] * 8)
    assert model._atc_info["tokens"][-1] < 30  # merging went on to the last blocks (the cap applies)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_tome_average_pooled_vit_without_class_token():
    torch.manual_seed(1)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=8, num_heads=3, num_classes=10, class_token=False,
        global_pool="avg", fc_norm=True).eval()
    atc.patch.timm(model, method="tome", trace_source=True)
    model.r = 6
    img = _images(2, 64)
    with torch.no_grad():
        out = model(img)
        ref, source = ref_tome_model(model, img, [6] * 8, return_source=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # source tracking follows the published layout: original token n sits in the slot whose source holds it
    token_map = model._atc_info["token_map"]
    assert torch.equal(source.argmax(1), token_map) and torch.equal(source.sum(1), torch.ones_like(source[:, 0]))
    assert torch.equal(model._atc_info["size"][..., 0], source.sum(2))


def test_tome_spatial_layout_is_an_explicit_option_and_differs():
    torch.manual_seed(1)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10).eval()
    img = _images(3, 64)
    atc.patch.timm(model, method="tome", layout="spatial")
    model.r = 8
    with torch.no_grad():
        spatial = model(img)
        published = ref_tome_model(model, img, [8] * 6)
    assert (spatial - published).abs().max() > 1e-4  # from the second merge on, other pairs merge
    with pytest.raises(ValueError, match="layout"):
        atc.patch.timm(timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32,
                                                                       depth=2, num_heads=2), layout="zigzag")


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5])
def test_registered_tome_models_equal_published(keep):
    torch.manual_seed(2)
    model = timm.create_model("tome_tiny_patch16_224", keep_rate=keep, **TINY).eval()
    kept = [int(64 * keep ** (i + 1)) for i in range(3)]
    r_per_block = [0] * 12
    for loc, before, after in zip((3, 6, 9), [64] + kept, kept):
        r_per_block[loc] = before - after
    img = _images(4)
    with torch.no_grad():
        out = model(img)
        ref = ref_tome_model(model, img, r_per_block)
    assert model._atc_info["tokens"][9] == 1 + kept[-1]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- K-Medoids, DPC-KNN
@pytest.mark.parametrize("method", ["kmedoids", "dpcknn"])
@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5])
def test_registered_clustering_models_equal_published(method, keep):
    torch.manual_seed(3)
    model = timm.create_model(f"{method}_tiny_patch16_224", keep_rate=keep, **TINY).eval()
    kept = [int(64 * keep ** (i + 1)) for i in range(3)]
    img = _images(5)
    with torch.no_grad():
        out = model(img)
        ref = ref_clustering_model(model, img, kept, method)
    assert model._atc_info["tokens"][9] == 1 + kept[-1]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_dpcknn_keeps_the_class_token_exactly():
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(2, 12, 4, generator=gen), torch.rand(2, 12, 1, generator=gen) + 0.5
    merge = atc.merge.dpc_knn(x, 5, protected_tokens=1)
    merged, _ = merge.merge_with_size(x, None, w)
    assert torch.equal(merged[:, 0], x[:, 0])


def test_published_dpcknn_state_dict_loads_strictly():
    torch.manual_seed(4)
    published = timm.models.vision_transformer.VisionTransformer(
        patch_size=16, embed_dim=32, depth=12, num_heads=2, img_size=128).state_dict()
    for idx in range(3):  # the published CTM modules: cluster_layers.N.score = Linear(dim, 1)
        published[f"cluster_layers.{idx}.score.weight"] = torch.randn(1, 32)
        published[f"cluster_layers.{idx}.score.bias"] = torch.randn(1)
    model = timm.create_model("dpcknn_tiny_patch16_224", keep_rate=0.7, **TINY).eval()
    assert set(model.state_dict()) == set(published)
    torch.nn.Module.load_state_dict(model, published, strict=True)
    model.load_state_dict(published)
    assert torch.equal(model.blocks[6].atc_token_score.weight, published["cluster_layers.1.score.weight"])
    img = _images(6)
    with torch.no_grad():
        torch.testing.assert_close(model(img), ref_clustering_model(model, img, [44, 31, 21], "dpcknn"),
                                   atol=ATOL, rtol=0)


def test_registered_dpcknn_traces_as_one_graph():
    """DPC-KNN's scores held outside the blocks (published names) keep the forward one static graph (the
    other methods' layouts are compiled in tests/test_compile.py)."""
    torch.manual_seed(5)
    model = timm.create_model("dpcknn_tiny_patch16_224", keep_rate=0.7, **TINY).eval()
    img = _images(7)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(img), model(img), atol=1e-6, rtol=0)
