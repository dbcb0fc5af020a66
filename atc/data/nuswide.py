"""NUS-WIDE in the ASL (Alibaba-MIIL) variant: ``root/nus_wid_data.csv`` with rows
``(path, "['label', ...]", train|val)`` (an optional header row), image paths relative to ``root/images`` or
``root``; 81 classes, sorted by name."""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Callable

import torch

from atc.data.common import DatasetError, FileListDataset, require_path

__all__ = ["NUSWideDataset", "CSV_NAME"]

CSV_NAME = "nus_wid_data.csv"


class NUSWideDataset(FileListDataset):
    def __init__(self, root: str | Path, split: str, transform: Callable | None = None,
                 classes: list[str] | None = None) -> None:
        root = Path(root)
        csv_path = require_path(root / CSV_NAME, f"the ASL NUS-WIDE list {CSV_NAME} (path, labels, split)",
                                "nuswide")
        rows = []
        with open(csv_path, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if len(row) < 3:
                    raise DatasetError(f"nuswide: row {n} of '{csv_path}' should be (path, labels, split): {row}")
                path, labels, which = row[-3], row[-2], row[-1].strip()
                if n == 1 and which not in ("train", "val"):
                    continue  # header
                try:
                    parsed = ast.literal_eval(labels)
                except (ValueError, SyntaxError) as exc:
                    raise DatasetError(f"nuswide: row {n} of '{csv_path}': labels {labels!r} are not a "
                                       "Python list like \"['sky', 'clouds']\"") from exc
                rows.append((path, [str(x) for x in parsed], which))
        self.classes = classes or sorted({c for _, labels, _ in rows for c in labels})
        index = {c: i for i, c in enumerate(self.classes)}
        base = root / "images" if (root / "images").is_dir() else root
        files, targets = [], []
        for path, labels, which in rows:
            if which != split:
                continue
            target = torch.zeros(len(self.classes))
            for c in labels:
                target[index[c]] = 1.0
            files.append(base / path)
            targets.append(target)
        if not files:
            raise DatasetError(f"nuswide: no rows with split '{split}' in '{csv_path}'.")
        super().__init__(files, targets, transform)
