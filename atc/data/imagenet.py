"""ImageNet-style class folders: ``root/{train,val}/<class>/<image>``; classes sorted by folder name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from atc.data.common import DatasetError, FileListDataset, require_path

__all__ = ["ImageFolderDataset", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe")


class ImageFolderDataset(FileListDataset):
    """``root/<split>/<class>/*.jpg``; ``classes`` lists the folder names in label order."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None) -> None:
        split_dir = require_path(Path(root) / split, f"the '{split}' split folder with one sub-folder per class "
                                 f"(root/{split}/<class>/<image>)", "imagenet")
        self.classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not self.classes:
            raise DatasetError(f"imagenet: '{split_dir}' has no class sub-folders; expected "
                               f"{split_dir}/<class>/<image>.")
        files, targets = [], []
        for label, name in enumerate(self.classes):
            for f in sorted((split_dir / name).rglob("*")):
                if f.suffix.lower() in IMG_EXTENSIONS:
                    files.append(f)
                    targets.append(label)
        if not files:
            raise DatasetError(f"imagenet: no images ({', '.join(IMG_EXTENSIONS)}) under '{split_dir}'.")
        super().__init__(files, targets, transform)
