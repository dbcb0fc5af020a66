"""Small shared utilities: atomic file writes, seeding, result tables and plots."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["atomic_save", "atomic_write_text", "seed_everything", "set_threads", "write_csv", "line_plot",
           "errorbar_plot"]


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


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in the CPU clustering (numba, :func:`atc.cluster.set_num_threads`): the
    scripts' ``--threads``. Both run on OpenMP, whose idle workers spin-wait between parallel regions; on cores busy
    with other work the spinning takes the core the computation needs (measured on a busy 2-core machine: 60-96 s
    per base epoch of the digits table with torch or numba at 2 threads, 7 s with both at 1), so limiting torch
    alone is not enough."""
    from atc.cluster import set_num_threads  # here, not at the top: atc.utils sits below the clustering

    torch.set_num_threads(n)
    set_num_threads(n)


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
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out, write ``fig`` as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), black first.
_COLORS = ("#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
_MARKERS = ("*", "s", "v", "^", "o", "D", "P", "X")
_LINESTYLES = ("-", "-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 3)))


def errorbar_plot(
    rows: Iterable[dict], x: str, y: str, yerr: str, *, panel: str, color: str, marker: str, label: str,
    path: str | os.PathLike, title: str = "", xlabel: str | None = None, ylabel: str | None = None,
    sharey: bool = True, order: str | None = None,
) -> Path:
    """Side-by-side panels (one per value of ``panel``, shared y axis unless ``sharey=False``: then each panel is
    labelled by its own name) of lines with error bars, saved as PNG.

    One line per value of ``label``; its colour is chosen by the value of ``color`` and its marker and line style
    by the value of ``marker`` (in order of first appearance), so two columns can be told apart at a glance (e.g.
    method by colour, variant by marker). A line joins its points in the order of ``x``, or of the column ``order``
    (e.g. a setting, where the measured ``x`` is noisy). A line with a single point (a reference, e.g. an unreduced model) is also drawn
    as a dashed horizontal line with a shaded ``y +- yerr`` band across its panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    colors = {v: _COLORS[i % len(_COLORS)] for i, v in enumerate(dict.fromkeys(frame[color]))}
    markers = {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(dict.fromkeys(frame[marker]))}
    styles = {v: _LINESTYLES[i % len(_LINESTYLES)] for i, v in enumerate(dict.fromkeys(frame[marker]))}
    panels = list(dict.fromkeys(frame[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), sharey=sharey, squeeze=False)
    for ax, name in zip(axes[0], panels):
        for line, part in frame[frame[panel] == name].groupby(label, sort=False):
            part = part.sort_values(order or x)
            c, m, ls = colors[part[color].iloc[0]], markers[part[marker].iloc[0]], styles[part[marker].iloc[0]]
            err = part[yerr].fillna(0.0)
            ax.errorbar(part[x], part[y], yerr=err, color=c, marker=m, markersize=8 if m == "*" else 6,
                        capsize=3, linewidth=1.5, linestyle=ls, label=str(line))
            if len(part) == 1:
                mean, sd = float(part[y].iloc[0]), float(err.iloc[0])
                ax.axhline(mean, color=c, linestyle="--", linewidth=1)
                ax.axhspan(mean - sd, mean + sd, color=c, alpha=0.08, linewidth=0)
        ax.set_title(str(name))
        ax.set_xlabel(xlabel or x)
        ax.grid(True, alpha=0.3)
        if not sharey:
            ax.set_ylabel(str(name))
    if sharey:
        axes[0][0].set_ylabel(ylabel or y)
    axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def labeled_scatter(
    rows: Iterable[dict], x: str, y: str, label: str, path: str | os.PathLike, *, title: str = "",
    xlabel: str | None = None, ylabel: str | None = None,
) -> Path:
    """One labelled point per row (e.g. a setting's cost against what it changes), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        ax.scatter(row[x], row[y], color=_COLORS[i % len(_COLORS)], marker=_MARKERS[i % len(_MARKERS)], s=50)
        ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)
