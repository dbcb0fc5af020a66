"""scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes): the built-in offline dataset."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "digits_split_indices", "DIGITS_MEAN", "DIGITS_STD"]

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def digits_split_indices(split: str) -> np.ndarray:
    """Fixed, stratified 80/20 split (seed 0): 1437 train and 360 val indices into ``load_digits()``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=VAL_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train_idx if split == "train" else val_idx)


class DigitsDataset(Dataset):
    """Digits as 3-channel PIL images (8x8, grey values 0..16 scaled to 0..255); the transform upsamples."""

    def __init__(self, split: str, transform: Callable | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        idx = digits_split_indices(split)
        pixels = (digits.images[idx] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        self.images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
        self.targets = [int(t) for t in digits.target[idx]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
