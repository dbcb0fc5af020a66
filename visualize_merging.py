#!/usr/bin/env python
"""Save a PNG showing which patches were merged into each final token, one panel per method/linkage.

    python visualize_merging.py --image cat.jpg --model deit_small_patch16_224 --checkpoint deit_small.pth \
        --r 16 --merge_fn atc tome --linkage average complete --output output/merges.png
    # no image at hand: a built-in digits sample (random weights unless --checkpoint)
    python visualize_merging.py --digits-index 0 --model vit_tiny_patch16_224 --input-size 96 --r 2 \
        --output output/merges_digit.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from atc.cluster import LINKAGES
    from atc.merge import MERGE_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (jpg, png, ...)")
    src.add_argument("--digits-index", type=int, help="use sample N of the built-in digits validation split")
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name")
    p.add_argument("--checkpoint", default=None, help="local weights (.pth); random weights without it")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels")
    p.add_argument("--r", type=int, default=16, help="tokens removed per block")
    p.add_argument("--r-sched", default="constant", choices=["constant", "decrease"], help="r schedule")
    p.add_argument("--merge_fn", nargs="+", default=["atc", "tome"], choices=sorted(MERGE_METHODS),
                   help="methods, one panel each (ATC: one per linkage)")
    p.add_argument("--linkage", nargs="+", default=["average"], choices=sorted(LINKAGES),
                   help="ATC linkages")
    p.add_argument("--output", default="output/merges.png", help="PNG to write")
    args = p.parse_args(argv)
    if args.image and not Path(args.image).is_file():
        p.error(f"--image {args.image} does not exist")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist (give a local file)")
    if args.r < 0:
        p.error("--r must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import timm
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    import atc.patch
    from atc.data import DatasetError, build_dataset, load_image
    from atc.data.transforms import build_transform
    from atc.checkpoint import CheckpointError, load_checkpoint
    from atc.visualize import merge_groups, save_panels

    try:
        if args.image:
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
            tensor = build_transform(args.input_size, False, mean, std, crop_pct=1.0)(load_image(args.image))
        else:
            dataset, info = build_dataset("digits", split="val", input_size=args.input_size)
            mean, std = info.mean, info.std
            tensor = dataset[args.digits_index][0]
    except (DatasetError, IndexError) as exc:
        sys.exit(f"error: {exc}")
    image = (tensor * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).permute(1, 2, 0)
    image = image.clamp(0, 1).numpy()

    model = timm.create_model(args.model, pretrained=False, img_size=args.input_size).eval()
    if args.checkpoint:
        try:
            load_checkpoint(model, args.checkpoint)
        except CheckpointError as exc:
            sys.exit(f"error: {exc}")
    patch = model.patch_embed.patch_size[0]
    panels: dict[str, np.ndarray] = {}
    for method in args.merge_fn:
        for linkage in args.linkage if method == "atc" else [args.linkage[0]]:
            atc.patch.timm(model, method=method, linkage=linkage, trace_source=True)
            model.r = (args.r, args.r_sched)
            title = f"{method} {linkage}" if method == "atc" else method
            panels[title] = merge_groups(model, tensor, tuple(model.patch_embed.grid_size))
            atc.patch.remove(model)
    out = save_panels(args.output, image, panels, patch)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
