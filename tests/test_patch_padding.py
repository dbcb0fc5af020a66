"""Padded batches through patched models: timm's NaFlexViT (patch masks) and transformers' attention masks
(SigLIP 2's pixel_attention_mask, ViT's attention_mask).

The reference is the same model run on each sample alone, without padding: a sample's logits in a padded batch
must equal them (its real tokens are merged as if it were alone, padding never merges with them and is masked
everywhere). With r = 0 the patched model is the unpatched one, padding included.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from timm.models.naflexvit import NaFlexVit, batch_patchify

import atc.patch

from _vit_reference import randomize

METHODS = ["atc", "tome", "kmedoids", "dpcknn"]
# image sizes (multiples of the 8-pixel patch): 24 patches, 4, 15, and a single patch
SIZES = [(32, 48), (16, 16), (40, 24), (8, 8)]


def naflex_batch(images: list[torch.Tensor], patch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaFlex inputs of images ``(3, H, W)``: patches ``(B, N, P*P*3)``, coordinates ``(B, N, 2)`` and the patch
    mask ``(B, N)``, every sample padded at the end to the longest."""
    rows = []
    for image in images:
        patches, (nh, nw) = batch_patchify(image[None], (patch, patch))
        yy, xx = torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij")
        rows.append((patches[0], torch.stack([yy.flatten(), xx.flatten()], dim=1)))
    n = max(p.shape[0] for p, _ in rows)
    patches = torch.zeros(len(rows), n, rows[0][0].shape[1])
    coords = torch.zeros(len(rows), n, 2, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        patches[i, :len(p)], coords[i, :len(p)], valid[i, :len(p)] = p, c, True
    return patches, coords, valid


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(3, h, w, generator=gen) for h, w in SIZES]


NAFLEX = {
    "gap": dict(global_pool="avg"),
    "cls_map": dict(class_token=True, global_pool="map"),
    "rope_cls": dict(class_token=True, global_pool="avg", rope_type="axial"),
    "reg_max": dict(class_token=True, reg_tokens=1, global_pool="max", pool_include_prefix=True),
}


def _naflex(kind: str) -> NaFlexVit:
    torch.manual_seed(0)
    return randomize(NaFlexVit(patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, **NAFLEX[kind]))


def _alone(model, images):
    return torch.cat([model(*naflex_batch([im])[:1], patch_coord=naflex_batch([im])[1],
                            patch_valid=naflex_batch([im])[2]) for im in images])


@pytest.mark.parametrize("kind", NAFLEX)
@pytest.mark.parametrize("method", METHODS)
def test_naflex_mixed_sizes_equal_each_sample_alone(kind, method):
    model = _naflex(kind)
    images = _images()
    patches, coords, valid = naflex_batch(images)
    with torch.no_grad():
        unpatched = model(patches, patch_coord=coords, patch_valid=valid)
        atc.patch.timm(model, method=method, linkage="complete")
        torch.testing.assert_close(model(patches, patch_coord=coords, patch_valid=valid), unpatched, rtol=0, atol=0)
        model.r = 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-patch sample alone cannot remove 3
            batched = model(patches, patch_coord=coords, patch_valid=valid)
            info = model._atc_info
            alone = _alone(model, images)
    p = model.num_prefix_tokens
    assert info["tokens"] == [p + 24 - 3, p + 24 - 6, p + 24 - 9]
    # real slots first: 24 - 9 patches left for the longest sample, one for the single patch
    assert info["valid"][:, p:].sum(1).tolist() == [15, 1, 6, 1]
    assert info["size"][:, p:].sum((1, 2)).tolist() == [24, 4, 15, 1]  # padding has size 0
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=2e-5)
    assert (batched - unpatched).abs().max() > 1e-3  # merging did change the logits


def test_naflex_details():
    """Proportional attention off still masks padding; forward_features reports the merged patch mask; a custom
    attention mask cannot follow merged tokens; mixed RoPE is refused at patch time; remove restores."""
    model = _naflex("cls_map")
    images = _images()
    patches, coords, valid = naflex_batch(images)
    atc.patch.timm(model, method="atc", proportional_attn=False)
    model.r = 2
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(patches, patch_coord=coords, patch_valid=valid), _alone(model, images),
                                   rtol=1e-5, atol=2e-5)
        feats = model.forward_features(patches, patch_coord=coords, patch_valid=valid)
        assert feats["patches"].shape[1] == 1 + 24 - 6 and feats["patch_valid"].shape == (4, 24 - 6)
        assert feats["patch_valid"].sum(1).tolist() == [18, 1, 9, 1]
        custom = torch.zeros(4, 1, 25, 25)
        with pytest.raises(ValueError, match="user attention mask cannot be combined"):
            model(patches, patch_coord=coords, patch_valid=valid, attn_mask=custom)
    atc.patch.remove(model)
    assert type(model) is NaFlexVit and not any(k.startswith("_atc") for m in model.modules() for k in m.__dict__)
    with pytest.raises(ValueError, match="rope_type='mixed'"):
        atc.patch.timm(NaFlexVit(patch_size=8, embed_dim=32, depth=2, num_heads=2, rope_type="mixed"))


def test_naflex_without_padding_equals_the_plain_image_forward():
    """A NaFlex batch without padding runs unmasked: the same result as the image tensor itself."""
    model = _naflex("rope_cls")
    atc.patch.timm(model, method="tome")
    model.r = 2
    image = _images()[0]
    with torch.no_grad():
        naflex = model(naflex_batch([image])[0], patch_coord=naflex_batch([image])[1],
                       patch_valid=naflex_batch([image])[2])
        plain = model(image[None])
    assert model._atc_info["valid"] is None
    torch.testing.assert_close(naflex, plain, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ transformers
transformers = pytest.importorskip("transformers")

SIGLIP2 = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, patch_size=4,
               num_patches=16)
SHAPES = [(4, 6), (3, 5), (1, 2), (2, 2)]  # patch grids: 24, 15, 2 and 4 patches


def siglip2_batch(shapes):
    n = max(h * w for h, w in shapes)
    gen = torch.Generator().manual_seed(5)
    pixels, mask = torch.zeros(len(shapes), n, 48), torch.zeros(len(shapes), n, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        pixels[i, :h * w] = torch.randn(h * w, 48, generator=gen)
        mask[i, :h * w] = 1
    return pixels, mask, torch.tensor(shapes)


@pytest.mark.filterwarnings("ignore:.*cannot remove the requested number")  # the 2-patch sample alone
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
def test_siglip2_padded_batch_equals_each_sample_alone(attn, method):
    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(**SIGLIP2)
    config._attn_implementation = attn
    model = randomize(transformers.Siglip2VisionModel(config))
    pixels, mask, shapes = siglip2_batch(SHAPES)
    with torch.no_grad():
        unpatched = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
        atc.patch.transformers(model, method=method)
        out = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
        torch.testing.assert_close(out, unpatched, rtol=0, atol=0)
        model.r = 3
        batched = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
        assert model._atc_info["tokens"] == [21, 18, 15]
        assert model._atc_info["valid"].sum(1).tolist() == [15, 6, 1, 1]
        alone = []
        for i, (h, w) in enumerate(SHAPES):
            one = pixels[i:i + 1, :h * w]
            alone.append(model(pixel_values=one, pixel_attention_mask=mask[i:i + 1, :h * w],
                               spatial_shapes=shapes[i:i + 1]).pooler_output)
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=2e-5)


def test_vit_attention_mask_is_padding():
    """ViTModel's attention_mask: the masked (padding) tokens of a sample never reach its class token."""
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    torch.manual_seed(0)
    model = randomize(transformers.ViTModel(transformers.ViTConfig(**small)))
    atc.patch.transformers(model, method="atc")
    model.r = 2
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 11:] = False
    with torch.no_grad():
        out = model(pixel_values=images, attention_mask=mask).pooler_output
        garbage = images.clone()
        garbage[1, :, 16:, 16:] = 100.0  # the last 4 patches, as padding content: must not matter
        torch.testing.assert_close(model(pixel_values=garbage, attention_mask=mask).pooler_output, out,
                                   rtol=1e-5, atol=1e-5)
    assert model._atc_info["valid"].sum(1).tolist() == [11, 5]


def test_attention_mask_without_padding_after_a_merge():
    """A 4-D mask that masks nothing reaches layers after a merge (proportional attention off: they run their own
    forward) and is dropped there, not applied at the wrong size."""
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    torch.manual_seed(0)
    model = randomize(transformers.ViTModel(transformers.ViTConfig(**small)))
    atc.patch.transformers(model, method="tome", proportional_attn=False)
    model.r = [2, 0, 0]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixel_values=images).pooler_output
        full = torch.ones(2, 1, 17, 17, dtype=torch.bool)
        torch.testing.assert_close(model(pixel_values=images, attention_mask=full).pooler_output, plain)
    assert model._atc_info["tokens"] == [15, 15, 15] and model._atc_info["valid"] is None
