"""Train ViT-Adapter + Mask R-CNN (torchvision) from an mmdet-style config, with token reduction.

Example:
  python MMDet_setup/train_mmdet.py MMDet_setup/configs/mask_rcnn/tomeatc-adapter-t-0.5x-ftune.py \
      --cfg-options model.backbone.linkage=single model.backbone.reduction_ratio=0.25 cumulative_iters=2 \
      --launcher none
  torchrun --nproc_per_node 2 MMDet_setup/train_mmdet.py CONFIG --launcher pytorch
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, e.g. MMDet_setup/configs/mask_rcnn/vit-adapter-t-3x.py")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", help="output folder (overrides work_dir)")
    p.add_argument("--resume", "--resume-from", dest="resume", help="checkpoint to resume from "
                   "(default: WORK_DIR/latest.pth if it exists)")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' when started by torchrun (DDP: NCCL on GPU, gloo on CPU)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.linkage=single cumulative_iters=2")
    p.add_argument("--wandb_project", help="log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    p.add_argument("--wandb_group", help="W&B run group")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_config(path: str, options: dict, work_dir: str | None = None):
    """Read ``path`` with mmengine and apply ``--cfg-options``; clear errors for a missing file or bad keys."""
    from mmengine.config import Config

    from atc.engine import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' not found (configs live in MMDet_setup/configs/mask_rcnn/)")
    cfg = Config.fromfile(path)
    if options:
        cfg.merge_from_dict(options)
    if work_dir:
        cfg.work_dir = work_dir
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from atc.engine import ConfigError

    try:
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
        if args.launcher == "pytorch" and "RANK" not in os.environ:
            raise ConfigError("--launcher pytorch needs torchrun (RANK/WORLD_SIZE unset); use --launcher none")
        from atc.detection.engine import build_model, train

        build_model(cfg)  # validate the model config (linkage, keep rate...) before loading data
        res = train(cfg, resume=args.resume or cfg.get("resume_from"), wandb_project=args.wandb_project,
                    wandb_group=args.wandb_group)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("final: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
