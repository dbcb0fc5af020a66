"""Evaluate a trained checkpoint: COCO bbox and segm AP (COCOeval), optionally at another keep rate.

  python MMDet_setup/test_mmdet.py CONFIG CHECKPOINT [--cfg-options model.backbone.reduction_ratio=0.5] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file used for training (or a variant with other reduction settings)")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by train_mmdet.py")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, help="override config keys")
    p.add_argument("--split", default="test", choices=["val", "test"], help="data split of the config to evaluate")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"], help="metrics")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none", help="'pytorch' under torchrun")
    args = p.parse_args(argv)

    from atc import distributed as D
    from atc.detection.engine import build_dataset, build_model, evaluate
    from atc.engine import ConfigError
    from atc.utils import atomic_write_text

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_mmdet import load_config

    try:
        cfg = load_config(args.config, args.cfg_options)
        model = build_model(cfg)
        if not Path(args.checkpoint).is_file():
            raise ConfigError(f"checkpoint '{args.checkpoint}' not found")
        import torch

        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        try:
            model.load_state_dict(ck["model"] if isinstance(ck, dict) and "model" in ck else ck)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ConfigError(f"checkpoint '{args.checkpoint}' does not fit this config's model (wrong "
                              f"architecture?): {str(exc).splitlines()[0]}") from exc
        dataset = build_dataset(cfg, args.split)
        device = D.init_distributed(cfg.get("device", "auto"))
        res = evaluate(model.to(device), dataset, device, metrics=tuple(args.eval))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if D.is_main_process():
        print(json.dumps(res, indent=1))
        if args.out:
            atomic_write_text(json.dumps(res, indent=1), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
