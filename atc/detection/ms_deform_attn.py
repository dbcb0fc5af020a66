"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, based on ``F.grid_sample``.

Runs on CPU and GPU without compiled ops (mmcv's CUDA kernel does not build here). Same maths as the
reference ``ms_deform_attn_core_pytorch``: every query samples ``n_points`` bilinear points per head and
level around its reference point and takes their attention-weighted sum.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ms_deform_attn_core", "MSDeformAttn"]


def ms_deform_attn_core(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """Sample and weight values.

    Args:
        value: ``(B, S, M, D)`` flattened values of all levels (``S = sum(H_l * W_l)``), M heads, D dims/head.
        spatial_shapes: ``[(H_l, W_l)]`` per level, in the order the levels are concatenated in ``value``.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` normalised ``(x, y)`` in ``[0, 1]``.
        attention_weights: ``(B, Lq, M, L, P)``.
    Returns:
        ``(B, Lq, M * D)``.
    """
    bsz, _s, heads, dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1] (align_corners=False: pixel centres at half-steps)
    sampled = []
    for lid, (h, w) in enumerate(spatial_shapes):
        v = value_list[lid].flatten(2).transpose(1, 2).reshape(bsz * heads, dim, h, w)
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(bsz * heads, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights.to(value.dtype)).sum(-1)
    return out.view(bsz, heads * dim, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention module (Zhu et al. 2021) with ViT-Adapter's ``ratio`` (value dims = ratio·d_model)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"d_model*ratio ({value_dim}) must be divisible by n_heads ({n_heads})")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR's init: heads start looking in evenly spread directions, points at growing distances.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
        """``query (B, Lq, C)``, ``reference_points (B|1, Lq, L|1, 2)`` normalised ``(x, y)``,
        ``input_flatten (B, S, C)`` -> ``(B, Lq, C)``."""
        bsz, lq, _ = query.shape
        s = input_flatten.shape[1]
        if s != sum(h * w for h, w in spatial_shapes):
            raise ValueError(f"input has {s} tokens but spatial_shapes {list(spatial_shapes)} describe "
                             f"{sum(h * w for h, w in spatial_shapes)}")
        value = self.value_proj(input_flatten).view(bsz, s, self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(bsz, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(bsz, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(bsz, lq, self.n_heads, self.n_levels, self.n_points)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
        loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, loc, weights))
