#!/usr/bin/env python
"""Throughput of the ViT-Adapter backbone and of the full Mask R-CNN detector, with and without token reduction.

Batch 1, as published. Random weights and a random image; every setting is measured in the same run, in
interleaved rounds (the best round counts), so the speed-ups against the unreduced model are fair on a shared
machine. Writes ``detection_throughput.csv`` (part, method, reduction_ratio, input_size, img_per_s, ms_per_img,
speedup_vs_none, tokens_after_locs) to --output_dir.

    python MMDet_setup/benchmark_backbone.py --input-size 512 --methods none tome average --reduction_ratio 0.7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("none", "tome", "single", "complete", "average", "svit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="MMDet_setup/configs/mask_rcnn/vit-adapter-t-3x.py",
                   help="detector config (its backbone and head settings are used)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.embed_dim=384")
    p.add_argument("--methods", nargs="+", default=["none", "tome", "average"], choices=METHODS,
                   help="none = no reduction; tome or an ATC linkage = merging at the reduction locations; "
                        "svit = dynamic pruning baseline")
    p.add_argument("--reduction_ratio", "--keep_rate", dest="reduction_ratio", type=float, default=0.7,
                   help="keep fraction of the current tokens at each reduction location, in (0, 1]")
    p.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=512,
                   help="square image side in pixels (multiple of 32)")
    p.add_argument("--parts", nargs="+", default=["backbone", "detector"], choices=["backbone", "detector"],
                   help="time the backbone alone and/or the whole detector (inference mode)")
    p.add_argument("--runs", type=int, default=5, help="timed forward passes per setting and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes before the rounds")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each setting's best round counts")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and input")
    p.add_argument("--output_dir", default="output/detection_benchmark", help="folder for the CSV")
    args = p.parse_args(argv)
    if not 0 < args.reduction_ratio <= 1:
        p.error(f"--reduction_ratio is the keep fraction and must be in (0, 1], got {args.reduction_ratio}")
    if args.input_size < 32 or args.input_size % 32:
        p.error(f"--input-size must be a positive multiple of 32, got {args.input_size}")
    if "tome" in args.methods and args.reduction_ratio < 0.5:
        p.error("ToMe removes at most half the tokens per location: use --reduction_ratio >= 0.5 with tome")
    for name in ("runs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def _model_cfg(cfg, method: str, keep: float) -> dict:
    model = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    backbone = dict(model["backbone"])
    if method == "none":
        backbone["reduction_ratio"] = None
    elif method == "svit":
        backbone = {k: v for k, v in backbone.items() if k not in ("reduction_ratio", "linkage")}
        backbone.update(type="SViTAdapter", keep_ratio=keep)
    else:
        backbone.update(reduction_ratio=keep, linkage=method)
    model["backbone"] = backbone
    return model


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from atc.detection.detector import build_detector
    from atc.engine import ConfigError
    from atc.utils import seed_everything, write_csv
    from train_mmdet import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        cfg = load_config(args.config, args.cfg_options)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    size = args.input_size
    seed_everything(args.seed)
    image = torch.rand(1, 3, size, size, device=device)

    settings = []  # (part, method, callable, model)
    for method in args.methods:
        model_cfg = _model_cfg(cfg, method, args.reduction_ratio)
        model_cfg["min_size"] = model_cfg["max_size"] = size
        seed_everything(args.seed)
        try:
            detector = build_detector(model_cfg).to(device).eval()
        except (ValueError, TypeError) as exc:
            sys.exit(f"error: bad model config for {method}: {exc}")
        backbone = detector.backbone.body
        if "backbone" in args.parts:
            settings.append(("backbone", method, lambda b=backbone: b(image), backbone))
        if "detector" in args.parts:
            settings.append(("detector", method, lambda d=detector: d([image[0]]), backbone))

    best = {(part, method): 0.0 for part, method, _, _ in settings}
    tokens = {}
    with torch.inference_mode():
        for _, _, fn, _ in settings:
            for _ in range(args.warmup):
                fn()
        bar = tqdm(total=args.repeats * len(settings) * args.runs, desc="benchmark", unit="fwd")
        for _ in range(args.repeats):
            for part, method, fn, _ in settings:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.runs):
                    fn()
                    bar.update(1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[part, method] = max(best[part, method], args.runs / (time.perf_counter() - start))
        bar.close()
    for _, method, _, backbone in settings:  # token counts after each reduction location in the last forward
        tokens[method] = "/".join(map(str, getattr(backbone, "last_token_counts", []))) or "-"

    rows = []
    for part, method, _, _ in settings:
        base = best.get((part, "none"))
        rows.append({"part": part, "method": method,
                     "reduction_ratio": 1.0 if method == "none" else args.reduction_ratio,
                     "input_size": size, "img_per_s": round(best[part, method], 3),
                     "ms_per_img": round(1000 / best[part, method], 2),
                     "speedup_vs_none": round(best[part, method] / base, 3) if base else float("nan"),
                     "tokens_after_locs": tokens[method] if method not in ("none", "svit") else "-"})
    out = Path(args.output_dir)
    path = write_csv(rows, out / "detection_throughput.csv")
    print(f"{'part':9s} {'method':9s} {'keep':>5s} {'img/s':>8s} {'ms/img':>8s} {'vs none':>8s}  tokens")
    for r in rows:
        print(f"{r['part']:9s} {r['method']:9s} {r['reduction_ratio']:5.2f} {r['img_per_s']:8.2f} "
              f"{r['ms_per_img']:8.1f} {r['speedup_vs_none']:7.3f}x  {r['tokens_after_locs']}")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
