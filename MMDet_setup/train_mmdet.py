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
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Top-level keys the engine reads besides those of the config files (so typos in --cfg-options are caught).
EXTRA_KEYS = {"auto_resume", "resume_from", "load_from", "fp16", "amp", "device", "seed", "cumulative_iters",
              "work_dir", "data_root"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    from atc.tracking import add_wandb_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, e.g. MMDet_setup/configs/mask_rcnn/vit-adapter-t-3x.py")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir",
                   help="folder for checkpoints and logs (overrides the config's work_dir)")
    p.add_argument("--resume", "--resume-from", dest="resume",
                   help="checkpoint to resume from (default: WORK_DIR/latest.pth if it exists)")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' when started by torchrun (DDP: NCCL on GPU, gloo on CPU)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.linkage=single cumulative_iters=2")
    add_wandb_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="set by old torch.distributed.launch; torchrun uses LOCAL_RANK (ignored)")
    return p.parse_args(argv)


def load_config(path: str, options: dict[str, Any] | None = None, work_dir: str | None = None):
    """Read ``path`` with mmengine and apply ``--cfg-options``; clear errors for a missing/broken file and for
    top-level keys neither the config nor the engine knows (typos)."""
    from mmengine.config import Config

    from atc.engine import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' not found (configs live in MMDet_setup/configs/mask_rcnn/)")
    try:
        cfg = Config.fromfile(path)
    except Exception as exc:  # noqa: BLE001 - syntax errors, missing _base_ files...
        raise ConfigError(f"cannot read config '{path}': {exc}") from exc
    options = dict(options or {})
    unknown = sorted({k.split(".")[0] for k in options} - set(cfg.keys()) - EXTRA_KEYS)
    if unknown:
        raise ConfigError(f"--cfg-options: unknown config key(s) {unknown} (top-level keys: "
                          f"{', '.join(sorted(set(cfg.keys()) | EXTRA_KEYS))})")
    if options:
        try:
            cfg.merge_from_dict(options)
        except Exception as exc:  # noqa: BLE001 - e.g. indexing into a non-dict value
            raise ConfigError(f"--cfg-options could not be applied: {exc}") from exc
    if work_dir:
        cfg.work_dir = work_dir
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from atc import distributed as D
    from atc.data.common import DatasetError
    from atc.engine import ConfigError
    from atc.tracking import require_wandb

    try:
        if args.launcher == "pytorch" and "RANK" not in os.environ:
            raise ConfigError("--launcher pytorch needs torchrun (RANK/WORLD_SIZE unset); use --launcher none")
        require_wandb(args.wandb_project)
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
        from atc.detection.engine import build_model, train

        build_model(cfg)  # fail fast on a bad model config (linkage, keep fraction...) before loading data
        res = train(cfg, resume=args.resume or cfg.get("resume_from"), wandb_project=args.wandb_project,
                    wandb_group=args.wandb_group, wandb_name=args.wandb_name)
        if D.is_main_process() and res:
            print("final: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()))
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
