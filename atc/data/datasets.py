"""``build_dataset``: every dataset of :mod:`atc.data` behind one entry point (see the package docstring)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from atc.data.coco import CocoMultiLabelDataset
from atc.data.common import DatasetError
from atc.data.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from atc.data.imagenet import ImageFolderDataset
from atc.data.nabirds import NABirdsDataset
from atc.data.nuswide import NUSWideDataset
from atc.data.transforms import DEFAULT_CROP_PCT, build_multilabel_transform, build_transform

__all__ = ["build_dataset", "DatasetInfo", "DATASETS", "MULTILABEL_DATASETS"]

DATASETS = ("digits", "imagenet", "nabirds", "coco", "nuswide")
MULTILABEL_DATASETS = ("coco", "nuswide")
SPLITS = ("train", "val")


class DatasetInfo(dict):
    """Facts about a dataset, readable as attributes or keys: ``num_classes``, ``multilabel``, ``mean``,
    ``std``, ``name``, ``split``, ``classes`` (names when known)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


def build_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    input_size: int = 224,
    is_train: bool = False,
    **options: Any,
) -> tuple[Any, DatasetInfo]:
    """Build a dataset and its transform.

    Args:
        name: one of :data:`DATASETS`.
        root: dataset folder (ignored for ``digits``).
        split: ``"train"`` or ``"val"``.
        input_size: side of the square ``(3, input_size, input_size)`` image tensors.
        is_train: training augmentation (timm RandAugment/RandomErasing, or ASL's for multi-label) when True,
            deterministic resize + centre crop otherwise.
        **options: transform options passed to :func:`atc.data.transforms.build_transform`
            (``crop_pct`` (default 0.875; 1.0 for digits), ``aa``, ``color_jitter``, ``interpolation``,
            ``reprob``, ``remode``, ``recount``, ``no_aug``), plus ``mean``/``std`` overrides.

    Returns:
        ``(dataset, info)``; items are ``(image (3, S, S) float tensor, target)`` with target an int class or
        a multi-hot float tensor ``(num_classes,)`` for multi-label datasets.
    """
    name = name.lower()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}.")
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; choose 'train' or 'val'.")
    if name != "digits" and root is None:
        raise DatasetError(f"dataset '{name}' needs a root folder (--data PATH); see docs/training.md for the "
                           "expected layout. Only 'digits' works without one.")
    multilabel = name in MULTILABEL_DATASETS
    default_mean, default_std = (DIGITS_MEAN, DIGITS_STD) if name == "digits" else (
        IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    mean = tuple(options.pop("mean", None) or default_mean)
    std = tuple(options.pop("std", None) or default_std)
    if name == "digits":
        # Digits fill the whole 8x8 frame: a 0.875 centre crop would cut strokes off.
        options.setdefault("crop_pct", 1.0)
    options.setdefault("crop_pct", DEFAULT_CROP_PCT)
    if multilabel:
        transform = build_multilabel_transform(input_size, is_train, mean, std, **options)
    else:
        transform = build_transform(input_size, is_train, mean, std, **options)

    classes: list[str] | None = None
    if name == "digits":
        dataset: Any = DigitsDataset(split, transform)
        num_classes, classes = 10, [str(i) for i in range(10)]
    elif name == "imagenet":
        dataset = ImageFolderDataset(root, split, transform)
        classes = dataset.classes
        num_classes = len(classes)
    elif name == "nabirds":
        dataset = NABirdsDataset(root, split, transform)
        num_classes = len(dataset.class_ids)
        classes = [dataset.class_names.get(str(c), str(c)) for c in dataset.class_ids]
    elif name == "coco":
        dataset = CocoMultiLabelDataset(root, split, transform)
        classes = dataset.classes
        num_classes = len(classes)
    else:
        # Class list from the whole csv, so train and val agree even if a class is absent from one split.
        dataset = NUSWideDataset(root, split, transform)
        classes = dataset.classes
        num_classes = len(classes)
    info = DatasetInfo(name=name, split=split, num_classes=num_classes, multilabel=multilabel, mean=mean, std=std,
                       classes=classes, input_size=input_size)
    return dataset, info
