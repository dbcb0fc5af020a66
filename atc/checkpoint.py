"""Reading model weights out of checkpoint files: one rule for every script and setup.

A checkpoint file is one of

- a training checkpoint written by :func:`atc.engine.fit` or the published DeiT/ATC code: a dict with ``model``
  (the trained weights), optionally ``model_ema`` (the EMA weights) and ``ema_best`` (true when the EMA weights
  evaluated better, so ``best_checkpoint.pth`` is meant to be used with them);
- a ``{"state_dict": ...}`` or ``{"model_state_dict": ...}`` wrapper (mmdet, Lightning, torchvision scripts);
- a bare state dict (timm, torchvision).

:func:`state_dict_from_checkpoint` picks the weights with this priority (``use_ema=None``, the default):

1. ``model_ema`` when ``ema_best`` is true and ``model_ema`` is a state dict;
2. ``model``;
3. ``model_ema`` when it is the only weights in a training checkpoint;
4. ``state_dict``, then ``model_state_dict``;
5. the dict itself.

``use_ema=True`` asks for ``model_ema`` (an error if there is none); ``use_ema=False`` never takes it.
:func:`resample_pos_embed` adapts a ViT's absolute position embedding trained at another input size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "read_checkpoint", "state_dict_from_checkpoint", "resample_pos_embed"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model (missing file, other architecture)."""


def read_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load`` a local file on the CPU; :class:`CheckpointError` if it is missing or unreadable.

    Tensors-only files load with ``weights_only=True``; the published checkpoints also pickle their argparse
    arguments, so other files (trusted, local) are fully unpickled.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"{what} file not found: {path} (only local files are used; nothing is downloaded)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - retried below with full unpickling; that error is the one reported
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which and why
        raise CheckpointError(f"cannot read {what} '{path}': {exc}") from exc


def state_dict_from_checkpoint(checkpoint: Any, *, use_ema: bool | None = None,
                               source: str = "checkpoint") -> dict[str, Tensor]:
    """The model weights inside ``checkpoint`` (a loaded file), chosen by the module's documented priority.

    Raises:
        CheckpointError: ``checkpoint`` is not a dict, or ``use_ema=True`` and it has no ``model_ema``, or
            ``use_ema=False`` and it only has EMA weights.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: expected a state dict or a dict with 'model', "
                              f"got {type(checkpoint).__name__}")
    model = checkpoint.get("model") if isinstance(checkpoint.get("model"), dict) else None
    ema = checkpoint.get("model_ema") if isinstance(checkpoint.get("model_ema"), dict) else None
    if use_ema:
        if ema is None:
            raise CheckpointError(f"{source} has no EMA weights ('model_ema'): load it without use_ema")
        return ema
    if model is not None or ema is not None:
        if ema is not None and use_ema is None and (checkpoint.get("ema_best") or model is None):
            return ema
        if model is None:
            raise CheckpointError(f"{source} only holds EMA weights ('model_ema'): load it with use_ema")
        return model
    for key in ("state_dict", "model_state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def resample_pos_embed(model: nn.Module, state_dict: dict[str, Tensor], *, antialias: bool = True) -> None:
    """Resample ``state_dict["pos_embed"]`` (bicubic, in place) to ``model``'s patch grid when the checkpoint was
    trained at another input size; prefix (class/distillation) tokens are kept as they are.

    Nothing happens when the shapes already agree, or when they cannot be a resizing of each other (another
    width, no square grid): the caller's key/shape check reports that. ``antialias`` only matters when
    shrinking: ``False`` is DeiT's ``--finetune`` rule, ``True`` timm's.
    """
    from timm.layers import resample_abs_pos_embed

    pe = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape == target.shape or getattr(model, "patch_embed", None) is None:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old_grid = math.isqrt(max(pe.shape[1] - prefix, 0))
    if old_grid == 0 or old_grid**2 != pe.shape[1] - prefix or pe.shape[-1] != target.shape[-1]:
        return
    state_dict["pos_embed"] = resample_abs_pos_embed(
        pe, new_size=list(model.patch_embed.grid_size), old_size=(old_grid, old_grid), num_prefix_tokens=prefix,
        interpolation="bicubic", antialias=antialias, verbose=False)
