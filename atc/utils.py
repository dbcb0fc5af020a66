"""Small shared utilities: atomic file writes, seeding, result tables and plots."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["atomic_save", "atomic_write_text", "seed_everything", "write_csv", "line_plot"]


def _atomic_replace(path: str | os.PathLike, write: Any) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the previous file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a partially written checkpoint behind."""
    return _atomic_replace(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_replace(path, lambda f: f.write(text.encode("utf-8")))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_csv(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write a list of dicts as CSV (atomically); columns in first-seen order."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    return atomic_write_text(frame.to_csv(index=False), path)


def line_plot(
    rows: Iterable[dict], x: str, y: str, group: str | list[str], path: str | os.PathLike, *,
    title: str = "", logx: bool = False, logy: bool = False, xlabel: str | None = None, ylabel: str | None = None,
) -> Path:
    """One line per value of ``group`` (a column or several), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    groups = [group] if isinstance(group, str) else list(group)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, part in frame.groupby(groups, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        part = part.sort_values(x)
        ax.plot(part[x], part[y], marker="o", label=" / ".join(str(k) for k in key))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
