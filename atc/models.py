"""Registered token-reduced DeiT models: ``{atc,tome,kmedoids,dpcknn}_{tiny,small,base}[_distilled]_patch16_224``.

Importing this module (``import atc`` does it) registers the names with timm:

    import timm, atc.models
    model = timm.create_model("atc_small_patch16_224", reduction_loc=[3, 6, 9], keep_rate=0.7,
                              linkage="complete", proportional_attn=True, num_classes=1000, img_size=224)
    atc.checkpoint.load_checkpoint(model, "best_checkpoint.pth")   # timm/DeiT state dict or the paper's format

or, with the checks and the errors the scripts use, :func:`build_classifier` (plain timm names too).

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

from typing import Any, Sequence

import torch
from torch import nn

from atc.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked
from atc.cli import ConfigError
from atc.cluster import LINKAGES
from atc.merge import validate_keep_rate
from atc.patch.common import KeepRateSchedule, check_options, patched_class

__all__ = ["build_classifier", "validate_reduction", "is_reduction_model", "reduction_settings", "load_checkpoint", "MODEL_NAMES",
           "REDUCTION_PREFIXES", "CheckpointError"]

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
_METHODS = ("atc", "tome", "kmedoids", "dpcknn")
MODEL_NAMES: list[str] = []
#: Name prefixes of the registered families, which take the token-reduction arguments.
REDUCTION_PREFIXES = tuple(f"{m}_" for m in _METHODS)


def _build(
    method: str,
    size: str,
    distilled: bool,
    pretrained: bool = False,
    reduction_loc: Sequence[int] = (3, 6, 9),
    keep_rate: float | Sequence[float] = 0.9,
    linkage: str | None = None,
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
    if linkage is None:  # the published models' default
        linkage = "complete"
    check_options(method, linkage, metric, backend)
    # embed_dim/depth/num_heads/patch_size/mlp_ratio override the named size (small models for tests and digits)
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
    atc.patch.timm(model, method=method, linkage=linkage, proportional_attn=proportional_attn, backend=backend,
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


def _registered_load_state_dict(self: nn.Module, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
    """``timm.create_model(..., checkpoint_path=...)`` loads through here: pos-embed resampling and a clear
    error listing mismatched keys instead of a deep traceback."""
    if not strict:
        return nn.Module.load_state_dict(self, state_dict, strict=False, assign=assign)
    load_state_dict_checked(self, dict(state_dict), "state dict")
    return torch.nn.modules.module._IncompatibleKeys([], [])


_register()


# --------------------------------------------------------------------------------------------------------------
# Building a classifier by name, with the checks and errors the scripts use
# --------------------------------------------------------------------------------------------------------------
def reduction_settings(model: nn.Module) -> dict[str, Any]:
    """The ``linkage`` and ``proportional_attn`` a built model actually uses, for a run's record (``args.json``,
    W&B): the registered defaults when no flag chose them. ``None`` where they do not apply: no reduction, or the
    linkage of a method other than ATC."""
    state = getattr(model, "_atc_state", None)
    if state is None:
        return {"linkage": None, "proportional_attn": None}
    return {"linkage": state.linkage if state.method == "atc" else None, "proportional_attn": state.proportional_attn}


def is_reduction_model(name: str) -> bool:
    """Whether ``name`` is a registered token-reduction model (takes ``reduction_loc``/``keep_rate``/...)."""
    return name.startswith(REDUCTION_PREFIXES)


def validate_reduction(keep_rate: float | Sequence[float] | None, reduction_loc: Sequence[int] | None,
                       linkage: str | None, depth: int | None = None) -> None:
    """Check reduction flags; raise :class:`~atc.cli.ConfigError` naming the fix. ``depth`` = number of blocks if
    known."""
    rates = keep_rate if isinstance(keep_rate, (list, tuple)) else [keep_rate]
    for kr in rates:
        if kr is not None:
            try:
                validate_keep_rate(kr, "--reduction_ratio/--keep_rate")
            except ValueError as exc:
                raise ConfigError(f"{exc}.") from None
    if linkage is not None and linkage not in LINKAGES:
        raise ConfigError(f"unknown linkage {linkage!r}; choose one of {', '.join(sorted(LINKAGES))}.")
    for loc in reduction_loc or []:
        if loc < 0 or (depth is not None and loc >= depth):
            raise ConfigError(f"reduction location {loc} is outside the model's blocks 0..{(depth or 1) - 1} "
                              "(--reduction_loc is 0-indexed).")


def build_classifier(
    model_name: str, num_classes: int, img_size: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    reduction_loc: Sequence[int] | None = None, keep_rate: float | Sequence[float] | None = None,
    linkage: str | None = None, proportional_attn: bool | None = None, model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create a randomly initialised classifier by registered timm name, for the training/validation scripts.

    Registered token-reduction names (``atc_/tome_/kmedoids_/dpcknn_*``) receive the reduction arguments; a
    ``None`` keeps the registered models' default (``reduction_loc`` 3 6 9, ``keep_rate`` 0.9, linkage
    ``complete``, proportional attention on for ATC/ToMe and off for K-Medoids/DPC-KNN), so a model is the same
    wherever it is built. Plain timm names (``deit_*``, ``vit_*``) ignore them. ``model_kwargs`` go to timm
    (e.g. ``embed_dim``/``depth``/``patch_size`` for a smaller model). Bad names or settings raise
    :class:`~atc.cli.ConfigError`.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if is_reduction_model(model_name):
        validate_reduction(keep_rate, reduction_loc, linkage if model_name.startswith("atc_") else None,
                           kwargs.get("depth"))
        given = dict(reduction_loc=None if reduction_loc is None else list(reduction_loc),
                     keep_rate=keep_rate, linkage=linkage,
                     proportional_attn=proportional_attn)
        kwargs.update({k: v for k, v in given.items() if v is not None})
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown model {model_name!r}. Examples: {', '.join(close) or 'deit_tiny_patch16_224'}; "
                          "token-reduction models: atc_/tome_/kmedoids_/dpcknn_{tiny,small,base}_patch16_224.")
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size,
                                 drop_rate=drop_rate, drop_path_rate=drop_path_rate, **kwargs)
    except (ValueError, AssertionError, TypeError) as exc:
        raise ConfigError(f"cannot build {model_name!r} with {kwargs}: {exc}") from exc
