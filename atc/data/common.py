"""Shared pieces of the dataset loaders: image reading with clear errors, a generic (path, target) dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from atc.errors import DatasetError

__all__ = ["DatasetError", "load_image", "FileListDataset", "require_path"]


def require_path(path: Path, what: str, dataset: str) -> Path:
    """Raise :class:`DatasetError` naming ``what`` was expected at ``path`` if it does not exist."""
    if not path.exists():
        raise DatasetError(f"{dataset}: expected {what} at '{path}', but it does not exist. "
                           f"Check --data (the dataset root); see docs/training.md for the expected layout.")
    return path


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; an unreadable file raises an error naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise DatasetError(f"cannot read image '{path}': {type(exc).__name__}: {exc}. "
                           "Replace or remove the corrupt file.") from exc


class FileListDataset(Dataset):
    """Images from a list of files with one target each: an int class, or a multi-hot float tensor."""

    def __init__(self, files: Sequence[Path], targets: Sequence[Any], transform: Callable | None = None) -> None:
        assert len(files) == len(targets)
        self.files = list(files)
        self.targets = list(targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = load_image(self.files[index])
        if self.transform is not None:
            img = self.transform(img)
        target = self.targets[index]
        if isinstance(target, torch.Tensor):
            target = target.clone()
        return img, target
