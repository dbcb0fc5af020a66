"""Show which image patches were merged into each final token (as ToMe's visualiser does).

    token_map = merge_groups(model, image_tensor)           # (h, w) final token id of every patch
    picture = render_groups(image_hwc, token_map, patch=16)  # each group filled with its mean colour, outlined
    save_panels("merges.png", image_hwc, {"ATC average": token_map, ...}, patch=16)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["merge_groups", "render_groups", "save_panels"]


def merge_groups(model: nn.Module, image: Tensor, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Run a model patched with ``trace_source=True`` on one image and return the patch grouping.

    Args:
        model: patched with :func:`atc.patch.timm` / :func:`atc.patch.swag` and ``trace_source=True``.
        image: ``(3, H, W)`` normalised input tensor.
        grid: patch grid ``(h, w)``; default: square from the number of patch tokens.

    Returns:
        ``(h, w)`` int array: the final output token holding each patch.
    """
    state = getattr(model, "_atc_state", None)
    if state is None or not state.trace_source:
        raise ValueError("patch the model with trace_source=True to visualise merges")
    with torch.no_grad():
        model(image.unsqueeze(0))
    token_map = model._atc_info["token_map"][0, state.protected:].cpu().numpy()
    if grid is None:
        side = int(round(len(token_map) ** 0.5))
        if side * side != len(token_map):
            raise ValueError(f"{len(token_map)} patches do not form a square grid: pass grid=(h, w)")
        grid = (side, side)
    return token_map.reshape(grid)


def render_groups(image: np.ndarray, groups: np.ndarray, patch: int) -> np.ndarray:
    """Fill every group of patches with its mean colour and outline group borders.

    Args:
        image: ``(H, W, 3)`` float array in ``[0, 1]`` with ``H = h * patch``, ``W = w * patch``.
        groups: ``(h, w)`` int group id per patch.
        patch: patch side in pixels.

    Returns:
        ``(H, W, 3)`` float array.
    """
    h, w = groups.shape
    if image.shape[0] != h * patch or image.shape[1] != w * patch:
        raise ValueError(f"image {image.shape[:2]} does not match a {h}x{w} grid of {patch}px patches")
    pixel_groups = np.kron(groups, np.ones((patch, patch), dtype=groups.dtype))
    out = np.empty_like(image)
    for g in np.unique(groups):
        mask = pixel_groups == g
        out[mask] = image[mask].mean(axis=0)
    border = np.zeros(pixel_groups.shape, dtype=bool)
    border[:, 1:] |= pixel_groups[:, 1:] != pixel_groups[:, :-1]
    border[1:, :] |= pixel_groups[1:, :] != pixel_groups[:-1, :]
    out[border] = 1.0
    return out


def save_panels(path: str | os.PathLike[str], image: np.ndarray, panels: dict[str, np.ndarray], patch: int) -> Path:
    """Save the input next to one rendered panel per method/linkage as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels) + 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.8))
    axes = np.atleast_1d(axes)
    axes[0].imshow(np.clip(image, 0, 1))
    axes[0].set_title("input")
    for ax, (title, groups) in zip(axes[1:], panels.items()):
        ax.imshow(np.clip(render_groups(image, groups, patch), 0, 1))
        ax.set_title(f"{title}\n{len(np.unique(groups))} tokens", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
