"""Model patchers: apply token merging to existing models in place, ToMe style.

    atc.patch.timm(model, method="atc", linkage="average")   # timm VisionTransformer
    model.r = 16
    atc.patch.swag(model, ...)                                # torchvision VisionTransformer (SWAG)
    atc.patch.transformers(model, ...)                        # Hugging Face ViT / CLIP / SigLIP / DINOv2
    atc.patch.diffusers(pipe, ratio=0.5)                      # diffusers UNet / PixArt / DiT / SD3 / Flux (ToMe-SD)
    atc.patch.remove(model)                                   # restore the original classes

Each patcher lives in its own module (``timm_vit``, ``torchvision_vit``, ``transformers_vit``,
``diffusion``) and is imported on first use, so optional dependencies (diffusers, transformers) are only
needed by the patchers that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["timm", "swag", "transformers", "diffusers", "remove"]

# Attribute set on a patched model: name of the module under atc.patch that patched it.
PATCH_ATTR = "_atc_patch_module"


def _module(name: str) -> Any:
    return importlib.import_module(f"atc.patch.{name}")


def timm(model: Any, **kwargs: Any) -> Any:
    """Patch a timm ``VisionTransformer`` in place; see :func:`atc.patch.timm_vit.apply_patch`."""
    return _module("timm_vit").apply_patch(model, **kwargs)


def swag(model: Any, **kwargs: Any) -> Any:
    """Patch a torchvision ``VisionTransformer`` (SWAG) in place; see :mod:`atc.patch.torchvision_vit`."""
    return _module("torchvision_vit").apply_patch(model, **kwargs)


def transformers(model: Any, **kwargs: Any) -> Any:
    """Patch a Hugging Face ``transformers`` vision model in place (ViT, CLIP, SigLIP, DINOv2); see
    :func:`atc.patch.transformers_vit.apply_patch`."""
    return _module("transformers_vit").apply_patch(model, **kwargs)


def diffusers(pipe_or_model: Any, **kwargs: Any) -> Any:
    """Patch a diffusers pipeline or denoiser (UNet, PixArt, DiT, SD3, Flux) in place; see
    :func:`atc.patch.diffusion.apply_patch`."""
    return _module("diffusion").apply_patch(pipe_or_model, **kwargs)


def remove(model: Any) -> Any:
    """Undo any atc patch on ``model`` (a ViT, a diffusers pipeline or denoiser); a no-op if it is not patched."""
    for candidate in (model, getattr(model, "unet", None), getattr(model, "transformer", None)):
        name = getattr(candidate, PATCH_ATTR, None) if candidate is not None else None
        if name is not None:
            return _module(name).remove_patch(model)
    return model
