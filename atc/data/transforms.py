"""Image transforms: timm's ImageNet-style pipelines, and the ASL-style pipeline for multi-label data."""

from __future__ import annotations

import random
from typing import Any, Sequence

from PIL import Image, ImageDraw
from timm.data import create_transform
from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T

__all__ = ["build_transform", "build_multilabel_transform", "CutoutPIL", "DEFAULT_CROP_PCT"]



def _safe_posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's RandAugment 'PosterizeIncreasing' asks for 0 bits at magnitude 10 (reachable with m9 + mstd noise),
    which recent Pillow rejects; 0 bits means an all-black image, as older Pillow produced."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _safe_posterize


_patch_timm_posterize()

# DeiT/timm evaluation protocol: resize to size/0.875, centre crop `size`.
DEFAULT_CROP_PCT = 0.875


def build_transform(
    input_size: int,
    is_train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    color_jitter: float | None = 0.3,
    aa: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    no_aug: bool = False,
    hflip: float = 0.5,
    **_: Any,
) -> Any:
    """timm's train (RandomResizedCrop + RandAugment + RandomErasing) or eval (resize + centre crop) transform.

    Returns a callable ``PIL.Image -> Tensor (3, input_size, input_size)``.
    """
    if is_train:
        return create_transform(
            input_size, is_training=True, no_aug=no_aug, color_jitter=color_jitter or 0.0,
            auto_augment=None if aa in (None, "", "none") else aa, interpolation=interpolation,
            re_prob=reprob, re_mode=remode, re_count=recount, mean=tuple(mean), std=tuple(std), hflip=hflip,
            crop_pct=crop_pct if no_aug else None,
        )
    return create_transform(
        input_size, is_training=False, interpolation="bicubic" if interpolation == "random" else interpolation,
        mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
    )


class CutoutPIL:
    """ASL's Cutout on PIL images: with probability ``p`` paint a random rectangle (up to half the side) with a
    random colour."""

    def __init__(self, cutout_factor: float = 0.5, p: float = 0.5) -> None:
        self.cutout_factor = cutout_factor
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        img = img.copy()
        draw = ImageDraw.Draw(img)
        w, h = img.size
        hc, wc = int(self.cutout_factor * h + 0.5), int(self.cutout_factor * w + 0.5)
        yc, xc = random.randint(0, h), random.randint(0, w)
        y1, y2 = max(0, yc - hc // 2), min(h, yc + hc // 2)
        x1, x2 = max(0, xc - wc // 2), min(w, xc + wc // 2)
        fill = (random.randint(0, 255), random.randint(0, 255), random.randint(0, 255))
        draw.rectangle([x1, y1, x2, y2], fill=fill)
        return img


def build_multilabel_transform(
    input_size: int, is_train: bool, mean: Sequence[float], std: Sequence[float], **_: Any
) -> Any:
    """ASL protocol: ``Resize((s, s))`` -> Cutout(0.5) -> RandAugment -> normalise (train); resize -> normalise (eval)."""
    steps: list[Any] = [T.Resize((input_size, input_size), interpolation=T.InterpolationMode.BICUBIC)]
    if is_train:
        steps += [CutoutPIL(0.5), rand_augment_transform("rand-m9-mstd0.5", {"translate_const": int(input_size * 0.45)})]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)
