#!/usr/bin/env python
"""Off-the-shelf token reduction: evaluate a pretrained ViT (no training) while sweeping r.

    # quick run on the built-in digits data (random weights unless --checkpoint is given)
    python validate_ots_sslbackbone.py --dataset digits --model-type augreg --model-name vit_tiny_patch16_224 \
        --input-size 64 --r 0 2 4 --merge_fn atc tome --linkage average -b 64 --results-dir output/ots
    # the paper's protocol: AugReg / SWAG / MAE checkpoints on the ImageNet val folder
    python validate_ots_sslbackbone.py --data /data/imagenet --model-type swag --model-name vit_b_16 \
        --input-size 384 --checkpoint vit_b16_swag.pth --r 0 8 16 --merge_fn atc --linkage complete

Models: ``augreg`` = timm ViTs (``--model-name`` any timm ViT), ``mae`` = timm ViT with global average pooling
(MAE fine-tuned checkpoints), ``swag`` = torchvision ``vit_b_16``/``vit_l_16``/``vit_h_14``. ToMe-style
proportional attention is on for AugReg/SWAG and off for MAE (ToMe's recommended setting for MAE models,
which were trained without it). Writes
``<results-dir>/<model>_<size>.csv`` (Model, Img_Size, r, Top-1, Top-5, Param, Merge_fn, Linkage, Tokens,
Throughput) and a Top-1 vs r plot.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

SWAG_MODELS = ("vit_b_16", "vit_l_16", "vit_h_14")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from atc.cluster import LINKAGES
    from atc.merge import MERGE_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset root (ImageNet: folder with val/<class>/<image>)")
    p.add_argument("--dataset", default="imagenet", help="dataset name for atc.data.build_dataset (imagenet, digits, ...)")
    p.add_argument("--model-type", default="augreg", choices=["augreg", "swag", "mae"], help="model family")
    p.add_argument("--model-name", default="vit_base_patch16_224",
                   help="timm model name (augreg/mae) or torchvision vit_b_16|vit_l_16|vit_h_14 (swag)")
    p.add_argument("--checkpoint", default=None, help="local weights file (.pth); without it weights are random")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the checkpoint's head, else the dataset's class count)")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels")
    p.add_argument("--r", type=int, nargs="+", default=[0, 8, 16], help="tokens removed per block, swept")
    p.add_argument("--r-sched", default="constant", choices=["constant", "decrease"], help="r schedule over blocks")
    p.add_argument("--merge_fn", nargs="+", default=["atc"], choices=sorted(MERGE_METHODS),
                   help="reduction method(s), swept")
    p.add_argument("--linkage", nargs="+", default=["average"], choices=sorted(LINKAGES),
                   help="ATC linkage(s), swept (ignored by other methods)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N images (quick runs)")
    p.add_argument("--num_workers", type=int, default=0, help="data loader workers")
    p.add_argument("--use_amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--results-dir", default="output/ots", help="folder for the CSV and plot")
    args = p.parse_args(argv)
    if any(r < 0 for r in args.r):
        p.error("--r values must be >= 0")
    if args.model_type == "swag" and args.model_name not in SWAG_MODELS:
        p.error(f"--model-type swag needs --model-name one of {', '.join(SWAG_MODELS)}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist (weights are never downloaded: give a local file)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _checkpoint_classes(weights: dict[str, torch.Tensor]) -> int | None:
    for key in ("head.weight", "heads.head.weight"):
        if key in weights:
            return int(weights[key].shape[0])
    return None


def build_model(args: argparse.Namespace, num_classes: int,
                weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The unpatched backbone with ``weights`` (the --checkpoint's state dict, read once by the caller) or random
    ones."""
    from atc.checkpoint import load_state_dict_checked

    if args.model_type == "swag":
        import torchvision

        model = getattr(torchvision.models, args.model_name)(weights=None, image_size=args.input_size,
                                                              num_classes=num_classes)
    else:
        import timm

        kwargs = dict(pretrained=False, num_classes=num_classes, img_size=args.input_size)
        if args.model_type == "mae":
            kwargs.update(global_pool="avg", fc_norm=True)  # MAE fine-tuning: mean of patch tokens, then fc_norm
        model = timm.create_model(args.model_name, **kwargs)
    if weights is not None:
        load_state_dict_checked(model, weights, f"checkpoint '{args.checkpoint}'")
    return model


def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: bool, desc: str) -> tuple[float, float, float]:
    """Top-1, Top-5 (percent) and images/s of the forward passes."""
    correct1 = correct5 = total = 0
    seconds = 0.0
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.no_grad():
        for images, targets in tqdm(loader, desc=desc, leave=False):
            images, targets = images.to(device), targets.to(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                logits = model(images)
            seconds += time.perf_counter() - start
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == targets).sum().item()
            correct5 += (top == targets[:, None]).any(dim=1).sum().item()
            total += targets.numel()
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1), total / max(seconds, 1e-9)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import atc.patch
    from atc.checkpoint import CheckpointError, read_checkpoint, state_dict_from_checkpoint
    from atc.data import DatasetError, build_dataset, usable_workers
    from atc.utils import line_plot, write_csv

    try:
        options = {"crop_pct": 1.0} if args.model_type == "swag" else {}
        dataset, info = build_dataset(args.dataset, args.data, split="val", input_size=args.input_size,
                                      is_train=False, **options)
    except DatasetError as exc:
        sys.exit(f"error: {exc}")
    if info.multilabel:
        sys.exit(f"error: off-the-shelf evaluation reports Top-1/Top-5; {args.dataset} is multi-label")
    if args.max_samples:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_samples, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=usable_workers(args.num_workers))
    device = torch.device(args.device)
    try:
        weights = (state_dict_from_checkpoint(read_checkpoint(args.checkpoint), source=args.checkpoint)
                   if args.checkpoint else None)
        num_classes = args.num_classes or (weights is not None and _checkpoint_classes(weights)) or info.num_classes
        model = build_model(args, num_classes, weights).to(device).eval()
        del weights  # the model holds its own copy
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    if not args.checkpoint:
        print("warning: no --checkpoint given, evaluating random weights (pipeline check only)", file=sys.stderr)
    params = sum(p.numel() for p in model.parameters())
    patch = atc.patch.swag if args.model_type == "swag" else atc.patch.timm
    proportional_attn = args.model_type != "mae"

    rows = []
    for merge_fn in args.merge_fn:
        for linkage in args.linkage if merge_fn == "atc" else [args.linkage[0]]:
            patch(model, method=merge_fn, linkage=linkage, proportional_attn=proportional_attn)
            for r in args.r:
                # set r afresh for every entry, so r=0 after a non-zero r really disables merging (defect 9)
                model.r = (r, args.r_sched)
                top1, top5, speed = evaluate(model, loader, device, args.use_amp, f"{merge_fn}/{linkage} r={r}")
                tokens = model._atc_info.get("tokens", [])
                rows.append({"Model": args.model_name, "Img_Size": args.input_size, "r": r, "Top-1": round(top1, 3),
                             "Top-5": round(top5, 3), "Param": params, "Merge_fn": merge_fn,
                             "Linkage": linkage if merge_fn == "atc" else "", "R_sched": args.r_sched,
                             "Tokens": tokens[-1] if tokens else "", "Throughput": round(speed, 2)})
                print(f"{merge_fn:8s} {linkage if merge_fn == 'atc' else '':8s} r={r:3d} top1={top1:6.2f} "
                      f"top5={top5:6.2f} tokens={rows[-1]['Tokens']} img/s={speed:.1f}")
            atc.patch.remove(model)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model_type}_{args.model_name}_{args.input_size}"
    write_csv(rows, out / f"{stem}.csv")
    line_plot(rows, "r", "Top-1", ["Merge_fn", "Linkage"], out / f"{stem}.png",
              title=f"{args.model_name} @ {args.input_size}px, off-the-shelf", xlabel="r (tokens removed per block)",
              ylabel="Top-1 (%)")
    print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
