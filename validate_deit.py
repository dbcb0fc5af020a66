#!/usr/bin/env python
"""Evaluate a checkpoint from train_deit.py (or any compatible state dict) and write a JSON report.

    python validate_deit.py --dataset digits --checkpoint runs/digits_atc/checkpoint.pth --input-size 112

The model is rebuilt from the arguments stored in the checkpoint. With ``--ots`` the token-reduction flags given
here (``--model``, ``--reduction_loc``, ``--keep_rate``, ``--linkage``, ``--proportional_attn``) replace the
stored ones, so trained weights can be evaluated at another keep rate or with another method. The JSON holds
per-image predictions and targets, Top-1/Top-5 (mAP for multi-label data) and the parameter count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from atc import distributed as D
from atc.checkpoint import load_state_dict_checked, read_checkpoint, state_dict_from_checkpoint
from atc.cli import ConfigError, parse_model_kwargs, run_cli
from atc.cluster import LINKAGES
from atc.data import DATASETS, MULTILABEL_DATASETS, ShardSampler, build_dataset, usable_workers
from atc.engine import amp_dtype_for, count_parameters, evaluate
from atc.models import build_classifier, validate_reduction


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("validate_deit.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", "--data-path", "--data_path", dest="data", default=None, help="dataset root folder")
    p.add_argument("--dataset", "--data-set", default=None, help=f"one of {', '.join(DATASETS)} (default: as trained)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (train_deit.py output or a state dict)")
    p.add_argument("-b", "--batch-size", "--batch_size", type=int, default=64, help="batch size")
    p.add_argument("--input-size", "--input_size", type=int, default=None, help="image side (default: as trained)")
    p.add_argument("--crop-pct", type=float, default=None, help="eval crop fraction (default 0.875; 1.0 digits)")
    p.add_argument("--output_dir", "--output-dir", default=None, help="where the JSON goes (default: next to the "
                   "checkpoint)")
    p.add_argument("--use_amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--num_workers", type=int, default=4, help="data-loader workers")
    p.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--dist-eval", "--dist_eval", action="store_true", help="shard evaluation over torchrun processes")
    g = p.add_argument_group("model (needed for plain state dicts; with --ots they override the checkpoint's)")
    g.add_argument("--ots", action="store_true", help="rebuild the model from the reduction flags given here")
    g.add_argument("--model", default=None, help="timm model name (default: as trained)")
    g.add_argument("--model-kwargs", "--model_kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs (default: as trained)")
    g.add_argument("--nb-classes", type=int, default=None, help="number of classes (default: the dataset's)")
    g.add_argument("--reduction_loc", type=int, nargs="+", default=None, help="0-indexed reduction blocks")
    g.add_argument("--reduction_ratio", "--keep_rate", dest="keep_rate", type=float, nargs="+", default=None,
                   help="keep rate(s) in (0, 1] (the published flag is --reduction_ratio: the fraction kept)")
    g.add_argument("--linkage", default=None, help=f"ATC linkage: {'|'.join(sorted(LINKAGES))}")
    g.add_argument("--proportional_attn", action="store_true", default=None, help="proportional attention")
    g.add_argument("--no-proportional_attn", dest="proportional_attn", action="store_false",
                   help="no proportional attention")
    return p


def resolve_config(args: argparse.Namespace, saved: dict[str, Any]) -> dict[str, Any]:
    """Merge the checkpoint's training arguments with the command line (reduction flags only with --ots)."""
    if "keep_rate" not in saved and "reduction_ratio" in saved:  # the published checkpoints' name for it
        saved = {**saved, "keep_rate": saved["reduction_ratio"]}

    def pick(cli: Any, key: str, default: Any, reduction: bool = False) -> Any:
        if cli is not None and (not reduction or args.ots or key not in saved):
            return cli
        return saved.get(key, default)

    cfg = {
        "dataset": args.dataset or saved.get("dataset"),
        "model": args.model or saved.get("model"),
        "model_kwargs": args.model_kwargs if args.model_kwargs is not None else saved.get("model_kwargs", []),
        "input_size": args.input_size or saved.get("input_size", 224),
        "reduction_loc": pick(args.reduction_loc, "reduction_loc", [3, 6, 9], True),
        "keep_rate": pick(args.keep_rate, "keep_rate", [1.0], True),
        # None: the model's own default (atc.models), as when it was trained without the flag
        "linkage": pick(args.linkage, "linkage", None, True),
        "proportional_attn": pick(args.proportional_attn, "proportional_attn", None, True),
        "crop_pct": args.crop_pct or saved.get("crop_pct"),
    }
    if args.ots and args.model:
        cfg["model"] = args.model
    if cfg["dataset"] is None:
        raise ConfigError("--dataset is required (the checkpoint does not say which dataset it was trained on).")
    if cfg["model"] is None:
        raise ConfigError("--model is required: the checkpoint has no stored training arguments.")
    if cfg["dataset"] not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg['dataset']!r}; choose one of {', '.join(DATASETS)}.")
    if not isinstance(cfg["keep_rate"], (list, tuple)):
        cfg["keep_rate"] = [cfg["keep_rate"]]
    validate_reduction(cfg["keep_rate"], cfg["reduction_loc"], cfg["linkage"])
    return cfg


def main(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.checkpoint)
    ckpt = read_checkpoint(path)
    saved = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved  # the published files pickle a Namespace
    cfg = resolve_config(args, saved or {})
    device = D.init_distributed(args.device)
    multilabel = cfg["dataset"] in MULTILABEL_DATASETS
    extra = {"crop_pct": cfg["crop_pct"]} if cfg["crop_pct"] else {}
    dataset, info = build_dataset(cfg["dataset"], args.data, "val", cfg["input_size"], is_train=False, **extra)
    num_classes = args.nb_classes or saved.get("num_classes") or info.num_classes
    kr = cfg["keep_rate"]
    model = build_classifier(cfg["model"], num_classes, cfg["input_size"], reduction_loc=cfg["reduction_loc"],
                             keep_rate=kr[0] if len(kr) == 1 else list(kr), linkage=cfg["linkage"],
                             proportional_attn=cfg["proportional_attn"],
                             model_kwargs=parse_model_kwargs(cfg["model_kwargs"]))
    # the trained weights ('model'; best_checkpoint.pth stores the better of model and EMA there), or the EMA
    # weights with --use-ema; from the file read above
    state = state_dict_from_checkpoint(ckpt, use_ema=True if args.use_ema else False, source=f"checkpoint '{path}'")
    load_state_dict_checked(model, state, f"checkpoint '{path}'")
    model.to(device)
    sampler = ShardSampler(dataset, D.get_world_size(), D.get_rank()) if args.dist_eval else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, sampler=sampler,
                                         num_workers=usable_workers(args.num_workers))
    res = evaluate(model, loader, device, multilabel=multilabel, gather=args.dist_eval, return_outputs=True,
                   amp_dtype=amp_dtype_for(device, args.use_amp))
    logits, targets = res.pop("logits"), res.pop("targets")
    report: dict[str, Any] = {
        "checkpoint": str(path), "model": cfg["model"], "model_kwargs": cfg["model_kwargs"],
        "dataset": cfg["dataset"], "input_size": cfg["input_size"], "reduction_loc": cfg["reduction_loc"],
        "keep_rate": kr, "linkage": cfg["linkage"], "proportional_attn": cfg["proportional_attn"],
        "ots": args.ots, "use_ema": args.use_ema, "num_params": count_parameters(model), **res,
    }
    if multilabel:
        report["predictions"] = torch.sigmoid(logits).tolist()
    else:
        report["predictions"] = logits.argmax(1).tolist()
        report["top5_predictions"] = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
    report["targets"] = targets.tolist()
    if D.is_main_process():
        out_dir = Path(args.output_dir) if args.output_dir else path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{cfg['model']}_kr{'-'.join(str(k) for k in kr)}_{cfg['linkage']}" if args.ots else cfg["model"]
        out = out_dir / f"validate_{path.stem}_{tag}.json"
        from atc.utils import atomic_write_text

        atomic_write_text(json.dumps(report), out)
        metric = f"mAP {res['mAP']:.2f}" if multilabel else f"Top-1 {res['top1']:.2f} Top-5 {res['top5']:.2f}"
        print(f"{cfg['model']} on {cfg['dataset']} ({res['n']} images): {metric}, "
              f"{report['num_params'] / 1e6:.2f} M params -> {out}")
        report["json_path"] = str(out)
    D.cleanup()
    return report


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
