"""Build the FID reference set: the first ``--per_class`` (5) images, in sorted order, of every ImageNet val class.

Expects the usual class-folder layout ``<val dir>/<wnid>/*.JPEG`` (1000 folders, as produced by the common
ImageNet "valprep" script or the Kaggle ``ILSVRC/Data/CLS-LOC/val`` after sorting into folders) and writes
``<output_dir>/<wnid>/<file>`` (5000 images for the full set). Every copied image is checked to decode.

    python SD_setup/create_im_valset.py --imagenet_val_dir /data/imagenet/val --output_dir imagenet_val_ref
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet_val_dir", "--data", dest="imagenet_val_dir", required=True,
                   help="ImageNet validation folder with one subfolder per class (<wnid>/*.JPEG)")
    p.add_argument("--output_dir", default="imagenet_val_ref", help="where to write the reference set")
    p.add_argument("--per_class", type=int, default=5, help="images per class (first N in sorted file order)")
    p.add_argument("--symlink", action="store_true", help="symlink instead of copying the images")
    return p


def select_reference_images(val_dir: str | Path, per_class: int = 5) -> dict[str, list[Path]]:
    """``{class folder: first per_class image paths (sorted by file name)}`` for every class folder, sorted."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise FileNotFoundError(f"ImageNet val folder {val_dir} does not exist")
    if per_class < 1:
        raise ValueError(f"--per_class must be at least 1, got {per_class}")
    class_dirs = sorted(d for d in val_dir.iterdir() if d.is_dir())
    if not class_dirs:
        loose = [f for f in val_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
        hint = (f" It holds {len(loose)} loose images: sort them into one folder per class first (e.g. with "
                "the ImageNet valprep script)." if loose else "")
        raise ValueError(f"{val_dir} has no class subfolders (<wnid>/*.JPEG).{hint}")
    selection = {}
    for d in class_dirs:
        images = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) < per_class:
            raise ValueError(f"class folder {d} has {len(images)} images, fewer than --per_class {per_class}")
        selection[d.name] = images[:per_class]
    return selection


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        selection = select_reference_images(args.imagenet_val_dir, args.per_class)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    from PIL import Image
    from tqdm import tqdm

    out = Path(args.output_dir)
    if len(selection) != 1000:
        print(f"note: {len(selection)} class folders (ImageNet-1K has 1000)")
    jobs = [(wnid, f) for wnid, files in selection.items() for f in files]
    for wnid, src in tqdm(jobs, desc="reference images"):
        try:
            with Image.open(src) as im:
                im.convert("RGB").load()
        except OSError as err:
            raise SystemExit(f"cannot read image {src} ({err}): replace it or remove it from the val folder") from None
        dst = out / wnid / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if args.symlink:
            dst.symlink_to(src.resolve())
        else:
            shutil.copy2(src, dst)
    print(f"wrote {len(jobs)} images of {len(selection)} classes to {out}")
    return out


if __name__ == "__main__":
    main()
