"""Gradient checkpointing on patched models: a training step with checkpointing on gives the loss and gradients
of the same step with it off, for every method, with timm's ``set_grad_checkpointing`` (VisionTransformer, EVA
with rotary tables, a padded NaFlexViT batch) and transformers' ``gradient_checkpointing_enable`` (reentrant and
not). The reference is the step without checkpointing; before the fix the recomputed blocks read the merge state
of the end of the forward and failed (ToMe: a size mismatch; ATC: a different number of saved tensors).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer

import atc.patch

from test_patch_padding import _images, naflex_batch

METHODS = ["atc", "tome", "kmedoids", "dpcknn"]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, drop_path_rate=0.1)


def _step(model, run, checkpointing: bool, enable) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and gradients; the same random stream for drop path and dropout both times."""
    enable(model, checkpointing)
    model.zero_grad()
    torch.manual_seed(5)
    loss = run(model)
    loss.backward()
    # (names without the hand-made checkpoint wrapper's ".block" of the torchvision test)
    return loss.detach(), {n.replace(".block.", "."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _assert_same_step(model, run, enable, atol: float = 0.0) -> None:
    loss, grads = _step(model, run, False, enable)
    tokens = model._atc_info["tokens"]
    loss_ckpt, grads_ckpt = _step(model, run, True, enable)
    assert model._atc_info["tokens"] == tokens  # the recomputation left the state as the forward did
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=atol)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=atol, msg=name)


def _timm_enable(model, on):
    model.set_grad_checkpointing(on)


# every method on timm's ViT; EVA (rotary tables carried by the state) with a merging and a selecting method
@pytest.mark.parametrize("family, method", [("vit", m) for m in METHODS] + [("eva", "atc"), ("eva", "kmedoids")])
def test_timm_set_grad_checkpointing(family, method):
    torch.manual_seed(0)
    model = VisionTransformer(**TINY) if family == "vit" else Eva(**TINY, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    atc.patch.timm(model, method=method, trace_source=True)
    model.r = 2
    model.train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    _assert_same_step(model, lambda m: F.cross_entropy(m(x), y), _timm_enable)


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_timm_naflex_padded_batch(method):
    torch.manual_seed(0)
    model = NaFlexVit(patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, class_token=True,
                      rope_type="axial", drop_path_rate=0.1)
    atc.patch.timm(model, method=method)
    model.r = 3
    model.train()
    patches, coords, valid = naflex_batch(_images()[:3])
    y = torch.tensor([0, 1, 4])
    _assert_same_step(model, lambda m: F.cross_entropy(m(patches, patch_coord=coords, patch_valid=valid), y),
                      _timm_enable)


@pytest.mark.parametrize("method", ["kmedoids"])  # the weights recorded one block ahead: the most state to replay
def test_timm_reentrant_checkpointing(method, monkeypatch):
    """timm's reentrant checkpoints: the forward runs under no_grad, the recomputation on detached inputs."""
    import timm.models._manipulate as manipulate

    monkeypatch.setattr(manipulate, "use_reentrant_ckpt", lambda: True)
    torch.manual_seed(0)
    model = VisionTransformer(**TINY)
    atc.patch.timm(model, method=method)
    model.r = 2
    model.train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    _assert_same_step(model, lambda m: F.cross_entropy(m(x), y), _timm_enable, atol=1e-6)


transformers = pytest.importorskip("transformers")
SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated")  # the names users know
# every method on ViT; DINOv2 (layer scale, drop path) with ToMe
@pytest.mark.parametrize("family, method", [("vit_cls", m) for m in METHODS] + [("dinov2", "tome")])
def test_transformers_gradient_checkpointing_enable(family, method):
    torch.manual_seed(0)
    if family == "vit_cls":
        model = transformers.ViTForImageClassification(
            transformers.ViTConfig(**SMALL, num_labels=3, hidden_dropout_prob=0.1))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, drop_path_rate=0.1))
    atc.patch.transformers(model, method=method)
    model.r = 2
    model.train()
    x = torch.randn(2, 3, 32, 32)

    def run(m):
        out = m(pixel_values=x)
        return (out.logits if family == "vit_cls" else out.pooler_output).square().mean()

    for reentrant, atol in ((False, 0.0), (True, 1e-5)):
        def enable(m, on):
            if on:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                m.gradient_checkpointing_disable()

        _assert_same_step(model, run, enable, atol=atol)


@pytest.mark.parametrize("method", ["atc"])
def test_torchvision_blocks_in_checkpoints(method):
    """torchvision's ViT has no checkpointing switch: blocks wrapped in torch.utils.checkpoint by hand."""
    from torch.utils.checkpoint import checkpoint
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    torch.manual_seed(0)
    model = TorchvisionViT(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                           num_classes=5)
    atc.patch.swag(model, method=method)
    model.r = 2
    model.train()
    blocks = list(model.encoder.layers)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])

    def enable(m, on):
        m.encoder.layers = torch.nn.Sequential(*[_Checkpointed(b) if on else b for b in blocks])

    _assert_same_step(model, lambda m: F.cross_entropy(m(x), y), enable)


class _Checkpointed(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
