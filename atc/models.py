"""Registered token-reduced DeiT models: ``{atc,tome,kmedoids,dpcknn}_{tiny,small,base}[_distilled]_patch16_224``.

Importing this module (``import atc`` does it) registers the names with timm:

    import timm, atc.models
    model = timm.create_model("atc_small_patch16_224", reduction_loc=[3, 6, 9], keep_rate=0.7,
                              linkage="complete", proportional_attn=True, num_classes=1000, img_size=224)
    atc.models.load_checkpoint(model, "best_checkpoint.pth")   # timm/DeiT state dict or the paper's format

Each is timm's DeiT (``VisionTransformer``, or ``VisionTransformerDistilled`` for ``_distilled``) patched with
:func:`atc.patch.timm` and a :class:`~atc.patch.common.KeepRateSchedule`: after reduction location ``idx``
``int(N_patches * keep_rate^(idx+1))`` patch tokens remain (the keep rate compounds over the
locations), whatever the input size.

They compute what the published models of the same names compute (tests/test_fidelity.py): proportional
attention on by default for ``atc``/``tome`` and off for ``kmedoids``/``dpcknn`` (plain blocks, as published),
ToMe's published token layout, and DPC-KNN's learned token scores under the published state-dict names
``cluster_layers.N.score`` (one ``Linear(dim, 1)`` per reduction location), so published checkpoints load.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from atc.checkpoint import CheckpointError, read_checkpoint, resample_pos_embed, state_dict_from_checkpoint
from atc.patch.common import KeepRateSchedule, check_options, patched_class

__all__ = ["load_checkpoint", "MODEL_NAMES", "CheckpointError"]

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
_METHODS = ("atc", "tome", "kmedoids", "dpcknn")
MODEL_NAMES: list[str] = []


def _build(
    method: str,
    size: str,
    distilled: bool,
    pretrained: bool = False,
    reduction_loc: Sequence[int] = (3, 6, 9),
    keep_rate: float | Sequence[float] = 0.9,
    linkage: str = "complete",
    proportional_attn: bool | None = None,
    checkpoint_path: str | None = None,
    backend: str = "auto",
    metric: str = "keys",
    layout: str = "published",
    **kwargs: Any,
) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    import atc.patch

    if pretrained:
        raise ValueError(
            "pretrained=True would download weights, which this project never does: pass a local file as "
            "checkpoint_path (or call atc.models.load_checkpoint(model, path))"
        )
    check_options(method, linkage, metric)
    arch = dict(_SIZES[size], **{k: kwargs.pop(k) for k in list(kwargs) if k in ("embed_dim", "depth", "num_heads")})
    depth = arch["depth"]
    # validated before the (possibly large) model is built
    schedule = KeepRateSchedule.build(reduction_loc, keep_rate, depth)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    kwargs.setdefault("patch_size", 16)  # the registered names are patch 16; smaller models (tests) may differ
    model = cls(**arch, **kwargs)
    if proportional_attn is None:  # as published: ATC/ToMe blocks use it, the K-Medoids/DPC-KNN models do not
        proportional_attn = method in ("atc", "tome")
    atc.patch.timm(model, method=method, linkage=linkage, prop_attn=proportional_attn, backend=backend,
                   metric=metric, layout=layout)
    model.r = schedule
    if method == "dpcknn":
        _published_token_scores(model, schedule)
    model.keep_schedule = schedule
    # timm.create_model(checkpoint_path=...) calls model.load_state_dict itself; route it through our checks.
    # One shared class for every registered model of a type (torch.compile guards on the type); remove_patch
    # restores the original class recorded by the patch, dropping this one too.
    model.__class__ = patched_class(model.__class__, {"load_state_dict": _registered_load_state_dict})
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    return model


#: state-dict prefixes of what the registered models add to DeiT (allowed to be missing from a checkpoint)
_NEW_MODULES = ("cluster_layers.",)


class TokenScore(nn.Module):
    """DPC-KNN's learned token score at one reduction location (TCFormer's CTM): ``score = Linear(C -> 1)``, the
    merge weights are ``exp(score(x))``. Named as in the published models (``cluster_layers.N.score``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)
        # the published models initialise it like every timm ViT linear layer
        nn.init.trunc_normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)


def _published_token_scores(model: nn.Module, schedule: KeepRateSchedule) -> None:
    """Give a registered DPC-KNN model the published state-dict layout: one :class:`TokenScore` per reduction
    location in ``model.cluster_layers``, instead of a score layer on every block.

    The block at location ``idx`` uses ``cluster_layers[idx].score``, held as a plain attribute (not a
    submodule), so each weight appears once in the state dict, under its published name. Blocks off the
    reduction locations have no score: these models reduce where ``reduction_loc`` says.
    """
    param = next(model.parameters())
    model.cluster_layers = nn.ModuleList(TokenScore(model.embed_dim) for _ in schedule.reduction_loc).to(param.device)
    for i, blk in enumerate(model.blocks):
        del blk._modules["atc_token_score"]
        if i in schedule.reduction_loc:
            object.__setattr__(blk, "atc_token_score", model.cluster_layers[schedule.reduction_loc.index(i)].score)


def _register() -> None:
    from timm.models import register_model

    for method in _METHODS:
        for size in _SIZES:
            for distilled in (False, True):
                name = f"{method}_{size}{'_distilled' if distilled else ''}_patch16_224"

                def entry(pretrained: bool = False, _m: str = method, _s: str = size, _d: bool = distilled,
                          **kwargs: Any) -> nn.Module:
                    return _build(_m, _s, _d, pretrained=pretrained, **kwargs)

                entry.__name__ = entry.__qualname__ = name
                entry.__module__ = __name__
                entry.__doc__ = (
                    f"DeiT-{size}{' (distilled)' if distilled else ''} with {method} token reduction at "
                    f"``reduction_loc`` keeping ``keep_rate`` per location."
                )
                globals()[name] = register_model(entry)
                MODEL_NAMES.append(name)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], strict_head: bool = True, *,
                    use_ema: bool | None = None, drop_mismatched_head: bool | None = None) -> nn.Module:
    """Load local weights into ``model`` (a registered model or any timm ViT), in place.

    Accepts every layout :func:`atc.checkpoint.state_dict_from_checkpoint` reads (a plain timm/DeiT state dict,
    ``{"state_dict": ...}``, or the paper's checkpoint with ``model``/``model_ema``/``ema_best``), with its
    priority and ``use_ema``. The position embedding is resampled (bicubic) when the checkpoint was trained at
    another input size. Parameters the patch adds (DPC-KNN's token scores: ``cluster_layers.N.score`` in the
    registered models, as published, ``blocks.N.atc_token_score`` in other patched models) may be absent.
    ``drop_mismatched_head=True`` (or the older ``strict_head=False``) skips classifier weights of another class
    count (fine-tuning on a new dataset).

    Raises:
        CheckpointError: missing file, or keys/shapes that do not match (all mismatches are listed).
    """
    if drop_mismatched_head is not None:
        strict_head = not drop_mismatched_head
    path = str(path)
    checkpoint = read_checkpoint(path)
    state_dict = dict(state_dict_from_checkpoint(checkpoint, use_ema=use_ema, source=path))
    return _check_and_load(model, state_dict, path, strict_head)


def _check_and_load(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                    strict_head: bool = True) -> nn.Module:
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    resample_pos_embed(model, state_dict)
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith(("head.", "head_dist."))}
    # DPC-KNN's token scores are new when fine-tuning from DeiT weights (the published code lists them as
    # its new modules): they may be absent
    missing = [k for k in own if k not in state_dict and "atc_token_score" not in k
               and not k.startswith(_NEW_MODULES)]
    unexpected = [k for k in state_dict if k not in own]
    shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if not strict_head:
        shape = [s for s in shape if s.split(":")[0] not in head_keys]
        for k in head_keys:
            if k in state_dict and state_dict[k].shape != own[k].shape:
                del state_dict[k]
    if missing or unexpected or shape:
        arch = getattr(model, "pretrained_cfg", {}) or {}
        lines = [f"checkpoint {source} does not fit this model ({type(model).__name__}"
                 f"{', ' + arch['architecture'] if 'architecture' in arch else ''}): is it another architecture?"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shape)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    nn.Module.load_state_dict(model, state_dict, strict=False)
    return model


def _registered_load_state_dict(self: nn.Module, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
    """``timm.create_model(..., checkpoint_path=...)`` loads through here: pos-embed resampling and a clear
    error listing mismatched keys instead of a deep traceback."""
    if not strict:
        return nn.Module.load_state_dict(self, state_dict, strict=False, assign=assign)
    _check_and_load(self, dict(state_dict), "state dict")
    return torch.nn.modules.module._IncompatibleKeys([], [])


_register()
