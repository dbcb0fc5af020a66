"""FID of every Stable Diffusion generation folder against the ImageNet reference set, as one CSV.

Every subfolder of ``--sd_gen_dir`` that holds images (as written by ``sd_generate.py``) is one experiment; if
``--sd_gen_dir`` itself holds images it is the only one. The reference features are computed once. Columns:
experiment, merge_fn, reduction_ratio, linkage, num_images, duration_mean, duration_std (seconds per image,
from ``generation.json``), fid. A PNG plot of FID against the reduction ratio is written beside the CSV.

The Inception network is the standard FID one, loaded from a local file: ``--inception_weights PATH`` or
``$ATC_INCEPTION_WEIGHTS`` (see docs/stable_diffusion.md for where to get it).

    python SD_setup/compute_fid_scores.py --mode clean --im_val_dir imagenet_val_ref --sd_gen_dir sd_generations
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METADATA_FILE = "generation.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="clean", choices=["clean"],
                   help="clean-fid protocol (clean: PIL bicubic resize to 299 before the network)")
    p.add_argument("--im_val_dir", required=True, help="reference images (from create_im_valset.py)")
    p.add_argument("--sd_gen_dir", required=True, help="folder of generation folders (from sd_generate.py)")
    p.add_argument("--inception_weights", default=None,
                   help="path to inception-2015-12-05.pt (default: $ATC_INCEPTION_WEIGHTS, then "
                        "~/.cache/atc/inception-2015-12-05.pt)")
    p.add_argument("--output_csv", default=None, help="CSV to write (default: <sd_gen_dir>/fid_scores.csv)")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass of the Inception network")
    p.add_argument("--num_workers", type=int, default=0, help="data loader worker processes (image decode/resize)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def _has_images(folder: Path) -> bool:
    from atc.fid import IMAGE_EXTENSIONS

    return any(f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for f in folder.iterdir())


def find_experiments(sd_gen_dir: str | Path) -> list[Path]:
    """Generation folders under ``sd_gen_dir`` (sorted), or ``[sd_gen_dir]`` if it holds images itself."""
    root = Path(sd_gen_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--sd_gen_dir {root} does not exist")
    if _has_images(root):
        return [root]
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _has_images(d))
    if not folders:
        raise ValueError(f"--sd_gen_dir {root} has no generation folders with images (run sd_generate.py first)")
    return folders


def experiment_info(folder: Path) -> dict:
    """Settings and per-image duration statistics from a folder's ``generation.json`` (empty if absent)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {"merge_fn": None, "reduction_ratio": None, "linkage": None,
                "duration_mean": math.nan, "duration_std": math.nan}
    meta = json.loads(path.read_text(encoding="utf-8"))
    args, durations = meta.get("args", {}), list(meta.get("durations", {}).values())
    mean = sum(durations) / len(durations) if durations else math.nan
    std = math.sqrt(sum((d - mean) ** 2 for d in durations) / len(durations)) if durations else math.nan
    merge_fn = args.get("merge_fn_str")
    return {
        "merge_fn": merge_fn,
        "reduction_ratio": 0.0 if merge_fn == "none" else args.get("reduction_ratio"),
        "linkage": args.get("linkage") if merge_fn == "atc" else None,
        "duration_mean": mean,
        "duration_std": std,
    }


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    from atc.fid import fid_from_features, folder_features, list_images, load_inception, resolve_inception_weights

    try:
        weights = resolve_inception_weights(args.inception_weights)
        experiments = find_experiments(args.sd_gen_dir)
        if len(list_images(args.im_val_dir)) < 2:
            raise ValueError(f"--im_val_dir {args.im_val_dir} holds fewer than 2 images (run create_im_valset.py)")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None

    import torch

    from atc.utils import line_plot, write_csv

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        extractor = load_inception(weights, device, args.mode)
        opts = dict(mode=args.mode, batch_size=args.batch_size, num_workers=args.num_workers)
        reference = folder_features(args.im_val_dir, extractor, description="reference features", **opts)
        rows = []
        for folder in experiments:
            feats = folder_features(folder, extractor, description=f"features {folder.name}", **opts)
            fid = fid_from_features(reference, feats)
            rows.append({"experiment": folder.name, **experiment_info(folder), "num_images": len(feats), "fid": fid})
            print(f"{folder.name}: FID {fid:.3f} over {len(feats)} images")
    except ValueError as err:
        raise SystemExit(str(err)) from None

    out = Path(args.output_csv) if args.output_csv else Path(args.sd_gen_dir) / "fid_scores.csv"
    columns = ["experiment", "merge_fn", "reduction_ratio", "linkage", "num_images", "duration_mean",
               "duration_std", "fid"]
    write_csv([{c: r[c] for c in columns} for r in rows], out)
    plotted = [r for r in rows if r["reduction_ratio"] is not None]
    if len(plotted) >= 2:
        for r in plotted:
            r["method"] = r["merge_fn"] + (f" ({r['linkage']})" if r["linkage"] else "")
        line_plot(plotted, "reduction_ratio", "fid", "method", out.with_suffix(".png"),
                  title="FID vs fraction of tokens removed", xlabel="reduction ratio (fraction removed)")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
