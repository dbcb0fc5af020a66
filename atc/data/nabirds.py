"""NABirds: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``,
``hierarchy.txt`` and ``images/`` in one root. The 555 leaf classes used by images are remapped to
contiguous ids in sorted order of their original id."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from atc.data.common import DatasetError, FileListDataset, require_path

__all__ = ["NABirdsDataset"]

REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "hierarchy.txt", "images")


def _read_pairs(path: Path) -> dict[str, str]:
    pairs = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"nabirds: line {n} of '{path}' should be '<id> <value>', got {line!r}.")
        pairs[parts[0]] = parts[1]
    return pairs


class NABirdsDataset(FileListDataset):
    """``split='train'`` uses ``is_training_img == 1`` rows, ``'val'`` the others."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None) -> None:
        root = Path(root)
        require_path(root, "the NABirds root folder (with " + ", ".join(REQUIRED) + ")", "nabirds")
        for name in REQUIRED:
            require_path(root / name, f"'{name}'", "nabirds")
        paths = _read_pairs(root / "images.txt")
        labels = _read_pairs(root / "image_class_labels.txt")
        is_train = _read_pairs(root / "train_test_split.txt")
        self.class_names = _read_pairs(root / "classes.txt")
        used = sorted({int(v) for v in labels.values()})
        self.class_ids = used  # contiguous label i <-> original class id used[i]
        remap = {c: i for i, c in enumerate(used)}
        want = "1" if split == "train" else "0"
        files, targets = [], []
        for image_id in sorted(paths):
            if image_id not in labels or image_id not in is_train:
                raise DatasetError(f"nabirds: image id {image_id} from images.txt is missing in "
                                   "image_class_labels.txt or train_test_split.txt.")
            if is_train[image_id].strip() == want:
                files.append(root / "images" / paths[image_id])
                targets.append(remap[int(labels[image_id])])
        if not files:
            raise DatasetError(f"nabirds: no '{split}' images listed in '{root / 'train_test_split.txt'}'.")
        super().__init__(files, targets, transform)
