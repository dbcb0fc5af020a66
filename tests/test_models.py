"""Registered models: keep-rate token counts (``int(N * keep_rate ** (idx + 1))`` after location ``idx``),
validation, checkpoints, DeiT equivalence."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import atc.models
from atc.models import CheckpointError, load_checkpoint

# small widths keep 224px (196 patches, the table's setting) fast; the token schedule does not depend on width
SMALL = dict(embed_dim=48, num_heads=2, num_classes=7)
X224 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _counts(model, locs=(3, 6, 9)):
    with torch.no_grad():
        model(X224)
    return [model._atc_info["tokens"][i] - model.num_prefix_tokens for i in locs]


@pytest.mark.parametrize("keep", [0.9, 0.8, 0.7, 0.5, 0.25])
@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_atc_counts_every_linkage(keep, linkage):
    model = timm.create_model("atc_tiny_patch16_224", keep_rate=keep, linkage=linkage, **SMALL).eval()
    assert _counts(model) == [int(196 * keep ** (i + 1)) for i in range(3)]


@pytest.mark.parametrize("name", ["kmedoids_tiny_patch16_224", "dpcknn_tiny_patch16_224",
                                  "atc_tiny_distilled_patch16_224"])
def test_other_methods_counts(name):
    model = timm.create_model(name, keep_rate=0.5, **SMALL).eval()
    assert _counts(model) == [98, 49, 24]
    assert model.num_prefix_tokens == (2 if "distilled" in name else 1)


@pytest.mark.parametrize("keep,planned", [(0.5, [98, 49, 24]), (0.25, [49, 12, 3])])
def test_tome_cap_warns_with_reached_counts(keep, planned):
    """Bipartite matching removes at most floor(free/2) per step: 196 -> 98 -> 49 -> 25 (49 -> 24 needs 25)."""
    model = timm.create_model("tome_tiny_patch16_224", keep_rate=keep, **SMALL).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = _counts(model)
    assert counts == [max(c, n - n // 2) for c, n in zip(planned, [196, 98, 49])] == [98, 49, 25]
    msgs = [str(w.message) for w in caught if "cannot remove" in str(w.message)]
    assert len(msgs) == 1 and "at most half" in msgs[0]


def test_per_location_keep_rates_and_custom_locations():
    model = timm.create_model("atc_tiny_patch16_224", keep_rate=[0.5, 0.5], reduction_loc=[2, 8], **SMALL).eval()
    assert _counts(model, (2, 8)) == [98, 49]


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_rate=0.0), "keep_rate"), (dict(keep_rate=1.5), "keep_rate"),
    (dict(reduction_loc=[3, 12]), "reduction_loc"), (dict(linkage="ward"), "linkage"),
    (dict(keep_rate=[0.5]), "one per location"), (dict(pretrained=True), "checkpoint_path"),
])
def test_bad_arguments_fail_before_building(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("atc_small_patch16_224", **kwargs)


def test_keep_one_equals_deit_and_checkpoint_formats(tmp_path):
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", **SMALL).eval()
    ema = timm.create_model("deit_tiny_patch16_224", **SMALL).eval()
    with torch.no_grad():
        ref, ref_ema = deit(X224), ema(X224)
    plain = tmp_path / "plain.pth"
    torch.save(deit.state_dict(), plain)
    model = timm.create_model("atc_tiny_patch16_224", keep_rate=1.0, checkpoint_path=str(plain), **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X224), ref, rtol=0, atol=1e-5)
    for ema_best, expected in ((True, ref_ema), (False, ref)):
        paper = tmp_path / f"paper_{ema_best}.pth"
        torch.save({"model": deit.state_dict(), "model_ema": ema.state_dict(), "ema_best": ema_best, "epoch": 3}, paper)
        model = load_checkpoint(timm.create_model("tome_tiny_patch16_224", keep_rate=1.0, **SMALL), paper).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(X224), expected, rtol=0, atol=1e-5)


def test_pos_embed_interpolation_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", **SMALL)
    path = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict()}, path)
    model = load_checkpoint(timm.create_model("atc_tiny_patch16_224", img_size=160, **SMALL), path)
    expected = resample_abs_pos_embed(deit.pos_embed.detach(), new_size=[10, 10], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*dist_token.*shape mismatches.*blocks\.0"):
        load_checkpoint(timm.create_model("atc_small_distilled_patch16_224", num_classes=7), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(deit, tmp_path / "missing.pth")


def test_dpcknn_score_is_learnable():
    model = timm.create_model("dpcknn_tiny_patch16_224", keep_rate=0.5, **SMALL)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    grads = [blk.atc_token_score.weight.grad for i, blk in enumerate(model.blocks) if i in (3, 6, 9)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_registered_names():
    names = set(timm.list_models("atc_*") + timm.list_models("tome_*"))
    for size in ("tiny", "small", "base"):
        assert {f"atc_{size}_patch16_224", f"tome_{size}_patch16_224"} <= names
    assert len(atc.models.MODEL_NAMES) == 24


def test_published_defaults_per_method():
    """Proportional attention as in the published models: ATC/ToMe on, K-Medoids/DPC-KNN (plain blocks) off;
    ToMe's published token layout."""
    for method, prop in (("atc", True), ("tome", True), ("kmedoids", False), ("dpcknn", False)):
        model = timm.create_model(f"{method}_tiny_patch16_224", keep_rate=0.7, **SMALL)
        assert model._atc_state.proportional_attn is prop and model._atc_state.layout == "published"
    model = timm.create_model("kmedoids_tiny_patch16_224", keep_rate=0.7, proportional_attn=True, layout="spatial",
                              **SMALL)
    assert model._atc_state.proportional_attn and model._atc_state.layout == "spatial"


def test_dpcknn_loads_deit_weights_and_published_checkpoints(tmp_path):
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", **SMALL)
    plain = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), plain)
    # fine-tuning from DeiT: the token scores are new (kept at their initialisation)
    model = load_checkpoint(timm.create_model("dpcknn_tiny_patch16_224", keep_rate=0.7, **SMALL), plain)
    assert torch.equal(model.blocks[0].attn.qkv.weight, deit.blocks[0].attn.qkv.weight)
    published = dict(deit.state_dict(), **{f"cluster_layers.{i}.score.{n}": torch.full(s, float(i + 1))
                                           for i in range(3) for n, s in (("weight", (1, 48)), ("bias", (1,)))})
    paper = tmp_path / "paper.pth"
    torch.save({"model": published, "epoch": 3}, paper)
    model = load_checkpoint(timm.create_model("dpcknn_tiny_patch16_224", keep_rate=0.7, **SMALL), paper)
    assert [float(model.blocks[i].atc_token_score.bias.detach()) for i in (3, 6, 9)] == [1.0, 2.0, 3.0]
    assert "blocks.3.atc_token_score.weight" not in model.state_dict()
