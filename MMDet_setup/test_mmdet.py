"""Evaluate a checkpoint written by train_mmdet.py: COCO bbox and segm AP (pycocotools COCOeval), printed and
optionally written as JSON. The model is rebuilt from the config, so a trained model can be evaluated at another
keep fraction or linkage with --cfg-options.

  python MMDet_setup/test_mmdet.py CONFIG CHECKPOINT [--cfg-options model.backbone.reduction_ratio=0.5] \\
      [--out metrics.json]
  torchrun --nproc_per_node 2 MMDet_setup/test_mmdet.py CONFIG CHECKPOINT --launcher pytorch
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    from atc.detection.config import LAUNCHERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config used for training (or a variant with other reduction settings)")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by train_mmdet.py")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.reduction_ratio=0.5 data_root=/data/coco/")
    p.add_argument("--split", default="test", choices=["val", "test"], help="data split of the config to evaluate")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"], help="metrics")
    p.add_argument("--out", help="also write the metrics (and the settings used) as JSON to this file")
    p.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="'pytorch' when started by torchrun (images are sharded over processes)")
    return p


def evaluate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Rebuild the model from the config, load the checkpoint, evaluate; print (and write) the metrics."""
    from atc import distributed as D
    from atc.detection.config import check_launcher, load_config
    from atc.detection.engine import build_dataset, build_model, evaluate, load_checkpoint_model
    from atc.detection.vit_adapter import config_keep_rate
    from atc.engine import amp_dtype_for
    from atc.utils import atomic_write_text

    try:
        check_launcher(args.launcher)
        cfg = load_config(args.config, args.cfg_options)
        model = build_model(cfg)
        load_checkpoint_model(model, args.checkpoint)
        dataset = build_dataset(cfg, args.split)
        device = D.init_distributed(str(cfg.get("device", "auto")))
        amp_dtype = amp_dtype_for(device, bool(cfg.get("amp", False) or cfg.get("fp16")))
        res = evaluate(model.to(device), dataset, device, metrics=tuple(args.eval), amp_dtype=amp_dtype)
        if D.is_main_process():
            print(json.dumps(res, indent=1))
            if args.out:
                backbone = cfg.model.backbone
                info = {"config": args.config, "checkpoint": args.checkpoint, "split": args.split,
                        "images": len(dataset), "backbone": backbone.get("type", "ViTAdapter"),
                        "keep_rate": config_keep_rate(backbone), "linkage": backbone.get("linkage"),
                        "metrics": res}
                atomic_write_text(json.dumps(info, indent=1), args.out)
        return res
    finally:
        D.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0, or 2 with one ``error: ...`` line for a bad option, file or checkpoint."""
    from atc.cli import run_cli

    return run_cli(evaluate_from_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
