"""COCO 2014 as multi-label classification: ``root/{train2014,val2014}`` and
``root/annotations/instances_{train,val}2014.json``; only images with at least one annotation; 80-dim
multi-hot targets with categories in sorted id order."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from atc.data.common import DatasetError, FileListDataset, require_path

__all__ = ["CocoMultiLabelDataset"]


class CocoMultiLabelDataset(FileListDataset):
    def __init__(self, root: str | Path, split: str, transform: Callable | None = None) -> None:
        from pycocotools.coco import COCO

        root = Path(root)
        ann = require_path(root / "annotations" / f"instances_{split}2014.json",
                           f"the COCO 2014 annotation file annotations/instances_{split}2014.json", "coco")
        img_dir = require_path(root / f"{split}2014", f"the image folder {split}2014/", "coco")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
            try:
                coco = COCO(str(ann))
            except Exception as exc:
                raise DatasetError(f"coco: cannot parse '{ann}': {exc}") from exc
        self.cat_ids = sorted(coco.getCatIds())
        self.classes = [coco.cats[c]["name"] for c in self.cat_ids]
        index = {c: i for i, c in enumerate(self.cat_ids)}
        files, targets = [], []
        for image_id in sorted(coco.imgToAnns):
            anns = coco.imgToAnns[image_id]
            if not anns:
                continue
            target = torch.zeros(len(self.cat_ids))
            for a in anns:
                target[index[a["category_id"]]] = 1.0
            files.append(img_dir / coco.imgs[image_id]["file_name"])
            targets.append(target)
        if not files:
            raise DatasetError(f"coco: '{ann}' has no annotated images.")
        super().__init__(files, targets, transform)
