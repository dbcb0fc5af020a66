"""atc.checkpoint: one rule for taking the weights out of a checkpoint file, used by every loader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from atc.checkpoint import CheckpointError, read_checkpoint, resample_pos_embed, state_dict_from_checkpoint

TRAINED, EMA = {"w": torch.zeros(2)}, {"w": torch.ones(2)}


@pytest.mark.parametrize("layout, use_ema, expected", [
    ({"model": TRAINED, "model_ema": EMA}, None, TRAINED),
    ({"model": TRAINED, "model_ema": EMA, "ema_best": False}, None, TRAINED),
    ({"model": TRAINED, "model_ema": EMA, "ema_best": True}, None, EMA),
    ({"model": TRAINED, "model_ema": EMA, "ema_best": True}, False, TRAINED),
    ({"model": TRAINED, "model_ema": EMA}, True, EMA),
    ({"model": TRAINED, "model_ema": None, "ema_best": True}, None, TRAINED),
    ({"model_ema": EMA}, None, EMA),
    ({"state_dict": TRAINED}, None, TRAINED),
    ({"model_state_dict": TRAINED}, None, TRAINED),
    (TRAINED, None, TRAINED),
])
def test_priority_on_saved_files(tmp_path, layout, use_ema, expected):
    path = tmp_path / "ckpt.pth"
    torch.save({**layout, "args": {"lr": 0.1}} if "model" in layout else layout, path)
    state = state_dict_from_checkpoint(read_checkpoint(path), use_ema=use_ema, source=str(path))
    assert torch.equal(state["w"], expected["w"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no EMA weights"):
        state_dict_from_checkpoint({"model": TRAINED}, use_ema=True)
    with pytest.raises(CheckpointError, match="only holds EMA"):
        state_dict_from_checkpoint({"model_ema": EMA}, use_ema=False)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        state_dict_from_checkpoint([1, 2])
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")


def _vit(img_size: int, num_classes: int = 3) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=num_classes)


def test_resample_pos_embed_matches_bicubic_interpolation_of_the_grid():
    model = _vit(64)  # 4x4 grid + class token
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 2 * 2, model.pos_embed.shape[-1])
    state = {"pos_embed": pe.clone()}
    resample_pos_embed(model, state, antialias=False)
    grid = pe[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(state["pos_embed"][:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 16, -1), atol=1e-6)
    assert torch.equal(state["pos_embed"][:, :1], pe[:, :1])
    other_width = {"pos_embed": torch.randn(1, 5, 7)}
    resample_pos_embed(model, other_width)  # not a resizing: left for the key/shape check
    assert other_width["pos_embed"].shape == (1, 5, 7)


def test_every_loader_uses_the_same_rule(tmp_path):
    """models.load_checkpoint, engine.load_pretrained and the detection loader pick the EMA weights of an
    ema_best checkpoint, resample the position embedding, and drop a mismatched head when asked."""
    from atc.detection.engine import _load
    from atc.engine import load_pretrained
    from atc.models import load_checkpoint

    source = _vit(32, num_classes=5)
    ema = {k: v + 1.0 for k, v in source.state_dict().items()}
    path = tmp_path / "best_checkpoint.pth"
    torch.save({"model": source.state_dict(), "model_ema": ema, "ema_best": True}, path)

    loaded = load_checkpoint(_vit(64, num_classes=3), path, drop_mismatched_head=True)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    assert loaded.pos_embed.shape[1] == 1 + 16
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(_vit(32, num_classes=3), path)
    plain = load_checkpoint(_vit(32, num_classes=5), path, use_ema=False)
    assert torch.equal(plain.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)

    finetuned = _vit(64, num_classes=3)
    missing = load_pretrained(finetuned, path)
    assert set(missing) == {"head.weight", "head.bias"}
    assert torch.equal(finetuned.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])

    _, state = _load(path, "load_from")
    assert torch.equal(state["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])


def test_private_helpers_are_gone():
    import atc.engine
    import atc.models

    assert not hasattr(atc.models, "_extract_state_dict") and not hasattr(atc.models, "_adapt_pos_embed")
    assert not hasattr(atc.engine, "_state_dict_from")
