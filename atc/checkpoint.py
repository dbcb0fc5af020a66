"""Checkpoints: reading model weights out of a file, one rule for every script and setup, and writing/resuming
training checkpoints.

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

:func:`load_checkpoint` is the one loader every script uses: it picks the weights by that rule, strips a DDP
``module.`` prefix, resamples the position embedding (:func:`resample_pos_embed`) and checks keys and shapes,
strictly (evaluation, resuming) or DeiT's ``--finetune`` way (``strict=False``: missing keys allowed and
returned, a classifier head of another class count dropped). Training checkpoints are written atomically by
:func:`save_checkpoint` and restored by :func:`load_for_resume`, RNG states included.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from atc import distributed as D
from atc.errors import CheckpointError, ConfigError
from atc.utils import atomic_save

__all__ = ["CheckpointError", "read_checkpoint", "state_dict_from_checkpoint", "load_checkpoint",
           "load_state_dict_checked", "resample_pos_embed", "resize_pos_embed", "save_checkpoint", "find_resume",
           "load_for_resume", "rng_state", "set_rng_state", "NEW_PARAMETERS"]

#: Parameters the token-reduction patches add to a ViT (DPC-KNN's learned token scores: ``cluster_layers.N.score``
#: in the registered models, as published, ``blocks.N.atc_token_score`` in other patched models). A checkpoint of
#: the unpatched model lacks them, and the published code lists them as its new modules, so they may be missing.
NEW_PARAMETERS = ("cluster_layers.", "atc_token_score")

#: Classifier-head prefixes (timm ``head``/``head_dist``, torchvision ``heads``).
HEAD_PREFIXES = ("head.", "head_dist.", "heads.")


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


def resize_pos_embed(pos_embed: Tensor, new_grid: Sequence[int], num_prefix_tokens: int = 0, *,
                     antialias: bool = True) -> Tensor:
    """Resample an absolute position embedding ``(1, P + G*G, C)`` (``P`` prefix tokens, then a square ``G x G``
    grid) bicubically to ``new_grid`` (``(H, W)``); prefix tokens are kept as they are. Returns
    ``(1, P + H*W, C)`` in the input dtype. ``antialias`` only matters when shrinking: ``False`` is DeiT's
    ``--finetune`` rule (and ViT-Adapter's), ``True`` timm's."""
    from timm.layers import resample_abs_pos_embed

    side = math.isqrt(pos_embed.shape[1] - num_prefix_tokens)
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=(side, side),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=antialias,
                                  verbose=False)


def resample_pos_embed(model: nn.Module, state_dict: dict[str, Tensor], *, antialias: bool = True) -> None:
    """Resample ``state_dict["pos_embed"]`` (bicubic, in place) to ``model``'s patch grid when the checkpoint was
    trained at another input size; prefix (class/distillation) tokens are kept as they are.

    Nothing happens when the shapes already agree, or when they cannot be a resizing of each other (another
    width, no square grid): the caller's key/shape check reports that. ``antialias`` as in
    :func:`resize_pos_embed`.
    """
    pe = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape == target.shape or getattr(model, "patch_embed", None) is None:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old_grid = math.isqrt(max(pe.shape[1] - prefix, 0))
    if old_grid == 0 or old_grid**2 != pe.shape[1] - prefix or pe.shape[-1] != target.shape[-1]:
        return
    state_dict["pos_embed"] = resize_pos_embed(pe, model.patch_embed.grid_size, prefix, antialias=antialias)


# --------------------------------------------------------------------------------------------------- loading
def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, use_ema: bool | None = None,
                    strict: bool = True, drop_mismatched_head: bool = False, antialias: bool = True,
                    what: str = "checkpoint") -> nn.Module:
    """Load the weights in the file ``path`` into ``model`` (in place) and return ``model``.

    The weights are chosen by the module's rule (``use_ema`` as in :func:`state_dict_from_checkpoint`) and
    checked by :func:`load_state_dict_checked` (``strict``, ``drop_mismatched_head``, ``antialias`` as there).

    Raises:
        CheckpointError: missing or unreadable file, or weights of another architecture (every mismatch listed).
    """
    source = f"{what} '{path}'"
    state_dict = state_dict_from_checkpoint(read_checkpoint(path, what), use_ema=use_ema, source=source)
    load_state_dict_checked(model, state_dict, source, strict=strict, drop_mismatched_head=drop_mismatched_head,
                            antialias=antialias)
    return model


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, Tensor], source: str = "state dict", *,
                            strict: bool = True, drop_mismatched_head: bool = False,
                            antialias: bool = True) -> list[str]:
    """Load ``state_dict`` into ``model`` after checking it fits; return the missing keys.

    A DDP ``module.`` prefix is stripped and the position embedding resampled to the model's grid
    (:func:`resample_pos_embed`). ``drop_mismatched_head`` skips classifier weights of another class count
    (fine-tuning on a new dataset). ``strict=True``: every model key (except :data:`NEW_PARAMETERS`) must be in
    the file and every file key in the model. ``strict=False`` (DeiT's ``--finetune``): missing and unexpected keys
    are allowed unless the file holds less than half of the model's tensors (another model). Shape mismatches are
    always an error.
    """
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    resample_pos_embed(model, state_dict, antialias=antialias)
    own = model.state_dict()
    dropped = [k for k in state_dict if drop_mismatched_head and k.startswith(HEAD_PREFIXES) and k in own
               and state_dict[k].shape != own[k].shape]
    for key in dropped:  # the new head keeps its initialisation
        del state_dict[key]
    missing = [k for k in own if k not in state_dict]
    required = [k for k in missing if k not in dropped and not any(p in k for p in NEW_PARAMETERS)]
    unexpected = [k for k in state_dict if k not in own]
    shape = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if not strict:
        # Missing and extra keys are fine (a new head, an MAE decoder), unless the file holds less than half of
        # the model: then it is another model.
        required = required if len(own) - len(missing) < len(own) / 2 else []
        unexpected = unexpected if required else []
    if required or unexpected or shape:
        arch = getattr(model, "pretrained_cfg", {}) or {}
        lines = [f"{source} does not fit this model ({type(model).__name__}"
                 f"{', ' + arch['architecture'] if 'architecture' in arch else ''}): is it another architecture? "
                 "Build the model that produced it (--model, --model-kwargs, --input-size)."]
        for title, keys in (("missing keys", required), ("unexpected keys", unexpected), ("shape mismatches", shape)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    nn.Module.load_state_dict(model, {k: v for k, v in state_dict.items() if k in own}, strict=False)
    return missing


# ----------------------------------------------------------------------------------------- training checkpoints
def rng_state() -> dict[str, Any]:
    """Every RNG state (Python, NumPy, torch, CUDA), stored in training checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Atomically save a checkpoint dict (only on the main process); returns the path."""
    if D.is_main_process():
        atomic_save(state, path)
    return Path(path)


def find_resume(resume: str | None, output_dir: str | os.PathLike | None) -> Path | None:
    """``--resume PATH`` if given (must exist), else ``output_dir/checkpoint.pth`` if present, else None."""
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(f"--resume '{resume}' does not exist.")
        return Path(resume)
    if output_dir and (Path(output_dir) / "checkpoint.pth").is_file():
        return Path(output_dir) / "checkpoint.pth"
    return None


def load_for_resume(path: str | os.PathLike, model: nn.Module, *, optimizer: Any = None, model_ema: Any = None,
                    scaler: Any = None, lr_scheduler: Any = None) -> dict[str, Any]:
    """Restore model/EMA/optimiser/scaler/scheduler states from a training checkpoint; return the checkpoint
    (``epoch`` = last finished epoch, ``num_updates``, ``best``, ``rng``...). RNG states are restored by
    :func:`atc.engine.fit` after the data loaders are built."""
    ckpt = read_checkpoint(path, "resume checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ConfigError(f"'{path}' is not a training checkpoint (no 'model' entry).")
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    try:
        module.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"checkpoint '{path}' does not fit this model (was it trained with other --model / "
                          f"--model-kwargs / --input-size?): {str(exc).splitlines()[0]}") from exc
    if model_ema is not None and ckpt.get("model_ema") is not None:
        model_ema.module.load_state_dict(ckpt["model_ema"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    return ckpt
