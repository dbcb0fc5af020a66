"""The 1000 ImageNet-1K classes (index, WordNet id, short readable name) used in the generation prompts of
``SD_setup/sd_generate.py``.

    from atc.sd.imagenet_classes import IMAGENET_CLASSES, select_classes
    select_classes(["0-2", "goldfish"])   # [ImageNetClass(index=0, wnid='n01440764', name='tench'), ...]

The table lives beside this file in ``imagenet_classes.tsv``: index order is the standard one (sorted WordNet
ids, the folder order of ``ImageNet/val``), names are short unique readable names ("tench", "great white
shark", "crane bird" vs "crane").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ImageNetClass", "IMAGENET_CLASSES", "load_imagenet_classes", "select_classes"]

_TABLE = Path(__file__).with_name("imagenet_classes.tsv")


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    name: str


def load_imagenet_classes(path: str | Path = _TABLE) -> list[ImageNetClass]:
    """Read the class table (a TSV with a header ``index wnid name``)."""
    rows = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    classes = []
    for row in rows:
        index, wnid, name = row.split("\t")
        classes.append(ImageNetClass(int(index), wnid, name))
    return classes


IMAGENET_CLASSES: list[ImageNetClass] = load_imagenet_classes()


def select_classes(selection: list[str] | None) -> list[ImageNetClass]:
    """Classes picked by index (``"3"``), index range (``"0-9"``), WordNet id or name; all when ``None``."""
    if not selection:
        return list(IMAGENET_CLASSES)
    by_key = {c.wnid: c for c in IMAGENET_CLASSES} | {c.name: c for c in IMAGENET_CLASSES}
    chosen: dict[int, ImageNetClass] = {}
    for item in selection:
        item = item.strip()
        if item in by_key:
            picked = [by_key[item]]
        else:
            lo, sep, hi = item.partition("-")
            try:
                first, last = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ValueError(
                    f"unknown ImageNet class {item!r}: give an index 0-999, a range like 0-9, a WordNet id "
                    f"(n01440764) or a name from {_TABLE.name} (e.g. 'goldfish')"
                ) from None
            if not 0 <= first <= last <= 999:
                raise ValueError(f"class index range {item!r} is outside 0-999")
            picked = IMAGENET_CLASSES[first : last + 1]
        for c in picked:
            chosen[c.index] = c
    return [chosen[i] for i in sorted(chosen)]
