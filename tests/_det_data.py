"""Tiny synthetic COCO-format instance segmentation data (real JPEG files + instances json) for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_coco(root: Path, num_images: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Squares (category 1) and discs (category 7) on a dark noisy background; masks as polygons / RLE-free
    polygons so pycocotools decodes them. Writes ``root/images/*.jpg`` and ``root/annotations/instances.json``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(num_images):
        img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            cat = int(rng.choice([1, 7]))
            s = int(rng.integers(size // 4, size // 2))
            x0, y0 = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            if cat == 1:
                mask = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
                poly = [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]
                color = (230, 60, 60)
            else:
                cx, cy, rad = x0 + s / 2, y0 + s / 2, s / 2
                mask = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= rad**2
                ang = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).reshape(-1).tolist()
                color = (60, 220, 80)
            img[mask] = color
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                         "bbox": [x0, y0, s, s], "area": float(mask.sum()), "segmentation": [poly]})
        name = f"{i:04d}.jpg"
        Image.fromarray(img).save(root / "images" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    cats = [{"id": 1, "name": "square"}, {"id": 7, "name": "disc"}]
    ann = root / "annotations" / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann


TINY_OPTIONS = [
    "model.backbone.embed_dim=48", "model.backbone.num_heads=3", "model.backbone.deform_num_heads=3",
    "model.backbone.conv_inplane=8", "model.backbone.norm=gn", "model.backbone.drop_path_rate=0.0",
    "model.neck.out_channels=32", "model.num_classes=2", "model.min_size=64", "model.max_size=64",
    "model.anchor_sizes=[8,16,32,64,128]", "model.representation_size=64", "model.mask_dim=16",
    "data.workers_per_gpu=0", "data.train.ann_file=annotations/instances.json", "data.train.img_prefix=images/",
    "data.val.ann_file=annotations/instances.json", "data.val.img_prefix=images/",
    "data.test.ann_file=annotations/instances.json", "data.test.img_prefix=images/",
    "load_from=None", "model.backbone.pretrained=None", "fp16=None", "device=cpu", "auto_resume=True",
]
