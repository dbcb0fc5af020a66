"""COCO-format instance segmentation data (pycocotools) and bbox/segm AP with COCOeval."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from atc.data.common import DatasetError

__all__ = ["CocoInstances", "collate", "coco_evaluate"]


class CocoInstances(Dataset):
    """``img_dir`` + ``ann_file`` (COCO instances json) -> ``(image (3, H, W) float in [0, 1], target)``.

    ``target``: ``boxes (N, 4)`` xyxy, ``labels (N,)`` contiguous 1..K (sorted category ids),
    ``masks (N, H, W)`` uint8, ``image_id``. ``flip_prob``: horizontal flip augmentation (training).
    """

    def __init__(self, img_dir: str | os.PathLike, ann_file: str | os.PathLike, flip_prob: float = 0.0) -> None:
        from pycocotools.coco import COCO

        self.img_dir, ann_file = Path(img_dir), Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file '{ann_file}' not found: set data_root / data.*.ann_file "
                                    f"(e.g. --cfg-options data_root=/path/to/coco/)")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder '{self.img_dir}' not found: set data_root / data.*.img_prefix")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(ann_file))
        except (ValueError, KeyError, TypeError) as exc:  # not JSON / not COCO instances
            raise DatasetError(f"'{ann_file}' is not a COCO instances annotation file: {exc!r}") from exc
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.flip_prob = flip_prob

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        path = self.img_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot read image '{path}' (image id {img_id}): {exc}. Fix or remove it from "
                               f"the annotation file.") from exc
        h, w = img.shape[:2]
        anns = [a for a in self.coco.imgToAnns[img_id]
                if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros(0, h, w, dtype=torch.uint8)
        image = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        if self.flip_prob and torch.rand(()) < self.flip_prob:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": torch.tensor(img_id)}


def collate(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_coco_results(outputs: Iterable[dict[str, Tensor]], image_ids: Iterable[int], label_to_cat: list[int]
                    ) -> list[dict[str, Any]]:
    """torchvision outputs -> COCO result dicts (xywh boxes, RLE masks thresholded at 0.5)."""
    from pycocotools import mask as mask_util

    results = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8) if "masks" in out else None
        for k in range(len(boxes)):
            x0, y0, x1, y1 = boxes[k].tolist()
            res = {"image_id": int(img_id), "category_id": label_to_cat[int(out["labels"][k]) - 1],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(out["scores"][k])}
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                res["segmentation"] = rle
            results.append(res)
    return results


def coco_evaluate(coco_gt: Any, results: list[dict[str, Any]], metrics: Iterable[str] = ("bbox", "segm"),
                  img_ids: list[int] | None = None) -> dict[str, float]:
    """COCOeval AP (0-100 scale ×0.01 as mmdet prints: ``bbox_mAP``, ``bbox_mAP_50``, ``bbox_mAP_75``, ...)."""
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    for metric in metrics:
        if metric not in ("bbox", "segm"):
            raise ValueError(f"unknown metric {metric!r}: choose bbox or segm")
        if not results:  # COCO.loadRes rejects an empty list; no detections means AP 0
            out.update({f"{metric}_mAP": 0.0, f"{metric}_mAP_50": 0.0, f"{metric}_mAP_75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, dt, metric)
            if img_ids is not None:
                ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        s = [max(float(v), 0.0) for v in ev.stats]
        out.update({f"{metric}_mAP": s[0], f"{metric}_mAP_50": s[1], f"{metric}_mAP_75": s[2],
                    f"{metric}_mAP_s": s[3], f"{metric}_mAP_m": s[4], f"{metric}_mAP_l": s[5]})
    return out
