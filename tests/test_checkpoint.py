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


def _file(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout, weights", [
    ("model", "trained"), ("model_ema", "ema"), ("ema_best", "ema"), ("ema_best_false", "trained"),
    ("bare", "trained"), ("state_dict", "trained"), ("ddp_prefix", "trained"),
])
def test_load_checkpoint_reads_every_layout_into_a_model(tmp_path, layout, weights):
    """One loader, each checkpoint layout on a real model file: the weights the rule picks end up in the model."""
    from atc.checkpoint import load_checkpoint

    torch.manual_seed(0)
    trained = _vit(32, num_classes=5).state_dict()
    ema = {k: v + 1.0 for k, v in trained.items()}
    obj = {"model": {"model": trained}, "model_ema": {"model_ema": ema},
           "ema_best": {"model": trained, "model_ema": ema, "ema_best": True, "args": {"lr": 0.1}},
           "ema_best_false": {"model": trained, "model_ema": ema, "ema_best": False},
           "bare": trained, "state_dict": {"state_dict": trained},
           "ddp_prefix": {"model": {f"module.{k}": v for k, v in trained.items()}}}[layout]
    model = load_checkpoint(_vit(32, num_classes=5), _file(tmp_path, "ckpt.pth", obj))
    expected = trained if weights == "trained" else ema
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_load_checkpoint_mismatched_head_and_other_sizes(tmp_path):
    """A head of another class count is an error unless dropped (then it keeps its initialisation); the position
    embedding is resampled to another input size; DeiT's --finetune mode (strict=False) accepts missing keys but
    not a file of another model."""
    from atc.checkpoint import load_checkpoint

    source = _vit(32, num_classes=5)
    path = _file(tmp_path, "best_checkpoint.pth", {"model": source.state_dict()})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(_vit(32, num_classes=3), path)
    target = _vit(64, num_classes=3)
    head = target.head.weight.clone()
    load_checkpoint(target, path, drop_mismatched_head=True)
    assert torch.equal(target.head.weight, head)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert target.pos_embed.shape[1] == 1 + 16

    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    path = _file(tmp_path, "partial.pth", partial)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(_vit(32, num_classes=5), path)
    load_checkpoint(_vit(32, num_classes=5), path, strict=False)  # --finetune: a new block is allowed
    unrelated = _file(tmp_path, "unrelated.pth", {"model": {"encoder.layer.0.weight": torch.zeros(3)}})
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(_vit(32, num_classes=5), unrelated, strict=False)


def test_every_loader_uses_the_same_rule(tmp_path):
    """atc.checkpoint.load_checkpoint (scripts, registered models) and the detection loader pick the EMA weights
    of an ema_best checkpoint."""
    from atc.checkpoint import load_checkpoint
    from atc.detection.engine import _load

    source = _vit(32, num_classes=5)
    ema = {k: v + 1.0 for k, v in source.state_dict().items()}
    path = _file(tmp_path, "best_checkpoint.pth", {"model": source.state_dict(), "model_ema": ema, "ema_best": True})
    loaded = load_checkpoint(_vit(64, num_classes=3), path, drop_mismatched_head=True)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    plain = load_checkpoint(_vit(32, num_classes=5), path, use_ema=False)
    assert torch.equal(plain.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    _, state = _load(path, "load_from")
    assert torch.equal(state["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])


def test_only_atc_checkpoint_reads_checkpoint_files():
    """Every script and library module loads weights through atc.checkpoint: no other torch.load."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for p in root.rglob("*.py") if not p.relative_to(root).parts[0] in (".venv", "tests", "build")
             and p.relative_to(root).as_posix() != "atc/checkpoint.py"]
    offenders = [str(p.relative_to(root)) for p in files if re.search(r"\btorch\.load\(", p.read_text())]
    assert not offenders, f"load checkpoints through atc.checkpoint instead of torch.load in {offenders}"


def test_private_helpers_are_gone():
    import atc.engine
    import atc.models

    assert not hasattr(atc.models, "_extract_state_dict") and not hasattr(atc.models, "_adapt_pos_embed")
    assert not hasattr(atc.engine, "_state_dict_from") and not hasattr(atc.engine, "load_pretrained")
    assert not hasattr(atc.models, "_check_and_load")
