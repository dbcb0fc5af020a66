"""Train ViT-Adapter + Mask R-CNN (torchvision) from an mmdet-style config, with token reduction (ATC / ToMe) or
the SViT pruning baseline.

Examples:
  python MMDet_setup/train_mmdet.py MMDet_setup/configs/mask_rcnn/tomeatc-adapter-t-0.5x-ftune.py \\
      --cfg-options model.backbone.linkage=single model.backbone.reduction_ratio=0.25 cumulative_iters=2 \\
      data.samples_per_gpu=8 work_dir=work_dirs/atc-single-0.25 --launcher none
  torchrun --nproc_per_node 2 MMDet_setup/train_mmdet.py CONFIG --launcher pytorch [...]

A rerun with the same work_dir resumes from work_dir/latest.pth (set auto_resume=False to start over).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    from atc.detection.config import LAUNCHERS
    from atc.tracking import add_wandb_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, e.g. MMDet_setup/configs/mask_rcnn/vit-adapter-t-3x.py")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir",
                   help="folder for checkpoints and logs (overrides the config's work_dir)")
    p.add_argument("--resume", "--resume-from", dest="resume",
                   help="checkpoint to resume from (default: WORK_DIR/latest.pth if it exists)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="'pytorch' when started by torchrun (DDP: NCCL on GPU, gloo on CPU)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.linkage=single cumulative_iters=2")
    add_wandb_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="set by old torch.distributed.launch; torchrun uses LOCAL_RANK (ignored)")
    return p


def train_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the config and model (failing fast on bad settings, before any data is read), then train."""
    from atc import distributed as D
    from atc.detection.config import check_launcher, load_config
    from atc.detection.engine import build_model, train
    from atc.tracking import require_wandb

    try:
        check_launcher(args.launcher)
        require_wandb(args.wandb_project)
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
        build_model(cfg)  # a bad model config (linkage, keep fraction...) is reported before loading data
        res = train(cfg, resume=args.resume or cfg.get("resume_from"), wandb_project=args.wandb_project,
                    wandb_group=args.wandb_group, wandb_name=args.wandb_name)
        if D.is_main_process() and res:
            print("final: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()))
        return res
    finally:
        D.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0, or 2 with one ``error: ...`` line for a bad option, file or checkpoint."""
    from atc.cli import run_cli

    return run_cli(train_from_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
