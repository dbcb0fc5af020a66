#!/usr/bin/env python
"""Throughput of the ViT-Adapter backbone and of the full Mask R-CNN detector, with and without token reduction.

Batch 1, as published. Randomly initialised models (built from a detector config) and one random image; every
setting is measured in the same run, interleaved over --repeats rounds after a warm-up, and each setting's best
round counts, so the speed-ups against the unreduced model are fair on a shared machine. Writes
detection_throughput.csv (part, method, reduction_ratio, input_size, img_per_s, ms_per_img, speedup_vs_none,
tokens_after_locs) and, with --plot, detection_throughput.png to --output_dir.

    python MMDet_setup/benchmark_backbone.py --input-size 512 --methods none tome average \\
        --reduction_ratio 0.7 0.5 --runs 5 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mask_rcnn" / "vit-adapter-t-3x.py"


def _methods() -> list[str]:
    """``--methods`` choices: none, ToMe, each ATC linkage (:data:`atc.cluster.LINKAGES`), and SViT pruning."""
    from atc.cluster import LINKAGES

    return ["none", "tome", *sorted(LINKAGES), "svit"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="detector config whose backbone/head settings are used (default: ViT-Adapter-T 3x; "
                        "use vit-adapter-s-3x.py for S)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.embed_dim=384")
    p.add_argument("--methods", nargs="+", default=["none", "tome", "average"], choices=_methods(),
                   help="none = no reduction; tome or an ATC linkage (single|complete|average) = merging at the "
                        "reduction locations; svit = dynamic pruning baseline (keep_ratio = the ratio)")
    p.add_argument("--reduction_ratio", "--keep_rate", dest="reduction_ratio", type=float, nargs="+", default=[0.7],
                   help="keep fraction(s) of the current tokens at each reduction location, in (0, 1]; several "
                        "values are measured in the same run")
    p.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=512,
                   help="square image side in pixels (multiple of 32); the detector is run at this size")
    p.add_argument("--parts", nargs="+", default=["backbone", "detector"], choices=["backbone", "detector"],
                   help="time the backbone alone and/or the whole detector (inference mode)")
    p.add_argument("--runs", type=int, default=5, help="timed forward passes per setting and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes per setting before the rounds")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each setting's best round counts")
    p.add_argument("--use_amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and input")
    p.add_argument("--plot", action="store_true", help="also write detection_throughput.png (speed-up per ratio)")
    p.add_argument("--output_dir", default="output/detection_benchmark", help="folder for the CSV (and plot)")
    args = p.parse_args(argv)
    for kr in args.reduction_ratio:
        if not 0 < kr <= 1:
            p.error(f"--reduction_ratio {kr} is not a keep fraction in (0, 1] (0.7 keeps 70% per location)")
    if args.input_size < 32 or args.input_size % 32:
        p.error(f"--input-size must be a positive multiple of 32, got {args.input_size}")
    for name in ("runs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def settings(methods: list[str], ratios: list[float]) -> tuple[list[tuple[str, float]], list[str]]:
    """(method, keep) pairs to measure, and notes on pairs that cannot run (ToMe below 0.5)."""
    pairs, notes = [], []
    if "none" in methods:
        pairs.append(("none", 1.0))
    for method in (m for m in methods if m != "none"):
        for kr in ratios:
            if method == "tome" and kr < 0.5:
                notes.append(f"skipped tome at keep {kr}: ToMe removes at most half the tokens per location")
                continue
            pairs.append((method, kr))
    return pairs, notes


def _model_cfg(cfg, method: str, keep: float, size: int) -> dict:
    model = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    backbone = {k: v for k, v in model["backbone"].items() if k != "pretrained"}
    # the config's keep rate, under its published key or ours, is replaced by this run's
    backbone = {k: v for k, v in backbone.items() if k not in ("keep_rate", "reduction_ratio", "keep_ratio")}
    if method == "none":
        backbone["keep_rate"] = None
    elif method == "svit":
        backbone = {k: v for k, v in backbone.items() if k not in ("linkage", "method")}
        backbone.update(type="SViTAdapter", keep_rate=keep)
    else:
        backbone.pop("linkage", None)  # a config's linkage='tome' (published spelling) would contradict method
        backbone.update(keep_rate=keep, **({"method": "tome"} if method == "tome" else
                                           {"method": "atc", "linkage": method}))
    model["backbone"] = backbone
    model["min_size"] = model["max_size"] = size  # run the detector at exactly --input-size
    return model


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from atc.cli import ConfigError
    from atc.detection.config import load_config
    from atc.detection.detector import build_detector
    from atc.engine import amp_dtype_for, autocast
    from atc.utils import line_plot, seed_everything, write_csv

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.cfg_options)
        device = torch.device(args.device)
        amp = amp_dtype_for(device, args.use_amp)
    except (ConfigError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    size = args.input_size
    seed_everything(args.seed)
    image = torch.rand(1, 3, size, size, device=device)
    pairs, notes = settings(args.methods, args.reduction_ratio)
    for note in notes:
        print(f"note: {note}")

    runs = []  # (part, method, keep, fn, backbone)
    for method, keep in pairs:
        seed_everything(args.seed)  # same weights for every setting
        try:
            detector = build_detector(_model_cfg(cfg, method, keep, size)).to(device).eval()
        except (ValueError, TypeError) as exc:
            sys.exit(f"error: bad model config for {method}: {exc}")
        backbone = detector.backbone.body
        if "backbone" in args.parts:
            runs.append(("backbone", method, keep, lambda b=backbone: b(image), backbone))
        if "detector" in args.parts:
            runs.append(("detector", method, keep, lambda d=detector: d([image[0]]), backbone))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = {(part, method, keep): 0.0 for part, method, keep, _, _ in runs}
    tokens = {}
    with torch.inference_mode(), autocast(device, amp):
        for part, method, keep, fn, backbone in tqdm(runs, desc="warm-up", leave=False):
            for _ in range(args.warmup):
                fn()
        bar = tqdm(total=args.repeats * len(runs) * args.runs, desc="benchmark", unit="fwd")
        for _ in range(args.repeats):
            for part, method, keep, fn, backbone in runs:
                sync()
                start = time.perf_counter()
                for _ in range(args.runs):
                    fn()
                sync()
                elapsed = time.perf_counter() - start
                bar.update(args.runs)
                best[part, method, keep] = max(best[part, method, keep], args.runs / elapsed)
                counts = getattr(backbone, "last_token_counts", [])
                tokens[method, keep] = "/".join(map(str, counts)) if counts else "-"
        bar.close()

    rows = []
    grid = (size // 16) ** 2
    for part, method, keep, _, _ in runs:
        base = best.get((part, "none", 1.0))
        rate = best[part, method, keep]
        rows.append({"part": part, "method": method, "reduction_ratio": keep, "input_size": size,
                     "img_per_s": round(rate, 3), "ms_per_img": round(1000 / rate, 2),
                     "speedup_vs_none": round(rate / base, 3) if base else float("nan"),
                     "tokens_after_locs": f"{grid} (no reduction)" if method == "none" else tokens[method, keep]})
    out = Path(args.output_dir)
    path = write_csv(rows, out / "detection_throughput.csv")
    print(f"{'part':9s} {'method':9s} {'keep':>5s} {'img/s':>8s} {'ms/img':>8s} {'vs none':>8s}  tokens after 3/6/9")
    for r in rows:
        print(f"{r['part']:9s} {r['method']:9s} {r['reduction_ratio']:5.2f} {r['img_per_s']:8.2f} "
              f"{r['ms_per_img']:8.1f} {r['speedup_vs_none']:7.3f}x  {r['tokens_after_locs']}")
    print(f"wrote {path}")
    if args.plot:
        reduced = [r for r in rows if r["method"] != "none"]
        if reduced:
            png = line_plot(reduced, "reduction_ratio", "speedup_vs_none", ["part", "method"],
                            out / "detection_throughput.png", xlabel="keep fraction per location",
                            ylabel="speed-up vs no reduction", title=f"ViT-Adapter throughput, {size}px, batch 1")
            print(f"wrote {png}")
    return rows


if __name__ == "__main__":
    main()
