"""SViT (Liu et al., "Revisiting token pruning for object detection and instance segmentation"):
dynamic token pruning baseline for the ViT-Adapter.

Per pruning block a selector ``LayerNorm -> Mlp(C, C/4, 2) -> LogSoftmax`` decides which tokens the block
processes. Training: hard Gumbel-softmax (tau=1) decisions, unselected tokens are masked out of the attention
keys and copied through; ratio loss ``4 * mean over blocks of (mean(s) - keep)^2``. Inference: only the selected
tokens run through the block; the rest are copied, so the full grid is always kept for the adapter.
Keep targets: ``[.7,.7,.7,.49,.49,.49,.343,.343,.343]`` on blocks 3-11, i.e. ``keep_rate ** stage``, so the
kept fraction compounds stage by stage, like the merging backbones' keep rate. The published SViT configs call
``keep_rate`` ``keep_ratio``; :func:`atc.detection.vit_adapter.resolve_keep_rate` maps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc.detection.vit_adapter import Block, Mlp, ViTAdapter, resolve_keep_rate

__all__ = ["SViTBlock", "SViTAdapter", "svit_keep_targets", "DEFAULT_KEEP_RATE"]

#: The published SViT keep rate (targets .7/.49/.343 per stage).
DEFAULT_KEEP_RATE = 0.7


def svit_keep_targets(keep_rate: float, prune_start: int = 3, depth: int = 12, stage_len: int = 3) -> dict[int, float]:
    """Block index -> target keep fraction: ``keep_rate ** (1 + (i - prune_start) // stage_len)``."""
    return {i: keep_rate ** (1 + (i - prune_start) // stage_len) for i in range(prune_start, depth)}


class SViTBlock(Block):
    """A :class:`Block` with an optional token selector (enabled by setting ``target_keep``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__(dim, num_heads, mlp_ratio, drop_path)
        # the published SViT blocks are torch TransformerEncoderLayers: LayerNorm eps 1e-5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.selector = nn.Sequential(nn.LayerNorm(dim), Mlp(dim, dim // 4, 2), nn.LogSoftmax(dim=-1))
        self.target_keep: float | None = None
        self.last_ratio_loss: Tensor | None = None
        self.last_kept: float | None = None

    def _dense(self, x: Tensor, bias: Tensor | None) -> Tensor:
        out, _ = self.attn(self.norm1(x), bias)
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, size: Tensor | None = None, merge: object = None):  # type: ignore[override]
        if self.target_keep is None:
            return self._dense(x, None), size, merge
        logp = self.selector(x)  # (B, T, 2): [keep, skip]
        if self.training:
            s = F.gumbel_softmax(logp, tau=1.0, hard=True)[..., :1]  # (B, T, 1), straight-through gradient
            # Pruned tokens are hidden from the attention keys (large negative bias), then copied through.
            bias = ((1 - s) * -1e4).squeeze(-1)[:, None, None, :]
            x = s * self._dense(x, bias) + (1 - s) * x
            self.last_ratio_loss = (s.mean() - self.target_keep) ** 2
            self.last_kept = float(s.detach().mean())
            return x, size, merge
        keep = logp[..., 0] >= logp[..., 1]  # (B, T)
        out = x.clone()
        for b in range(x.shape[0]):  # variable token counts per image: run each sample on its kept tokens
            idx = keep[b].nonzero().squeeze(1)
            if idx.numel():
                out[b, idx] = self._dense(x[b:b + 1, idx], None)[0]
        self.last_ratio_loss, self.last_kept = None, float(keep.float().mean())
        return out, size, merge


class SViTAdapter(ViTAdapter):
    """ViT-Adapter whose blocks prune tokens dynamically (SViT); ``keep_rate`` (default 0.7) sets the per-stage
    targets ``keep_rate ** stage``. ``keep_ratio`` (the published SViT configs' key) and ``reduction_ratio`` (the
    merging configs' key, which the SViT configs set to ``None``) are accepted as its published names, mapped by
    :func:`atc.detection.vit_adapter.resolve_keep_rate` (two of them set to different values is an error)."""

    block_cls = SViTBlock

    def __init__(self, *, keep_rate: float | None = None, prune_start: int = 3, ratio_loss_weight: float = 4.0,
                 keep_ratio: float | None = None, reduction_ratio: float | None = None, **kw: object) -> None:
        keep = resolve_keep_rate(keep_rate=keep_rate, keep_ratio=keep_ratio, reduction_ratio=reduction_ratio)
        kw.pop("linkage", None)  # inherited from the merging configs; SViT has no clustering
        kw.pop("method", None)
        super().__init__(keep_rate=None, **kw)  # no merging: the blocks prune instead
        self.keep_rate = DEFAULT_KEEP_RATE if keep is None else keep
        self.ratio_loss_weight = float(ratio_loss_weight)
        for i, target in svit_keep_targets(self.keep_rate, prune_start, len(self.blocks)).items():
            self.blocks[i].target_keep = target

    def extra_loss(self) -> Tensor | None:
        """SViT's ratio loss of the last training forward: ``ratio_loss_weight * mean over pruning blocks of
        (kept fraction - target)^2`` (weight 4 as published); ``None`` in eval mode."""
        losses = [b.last_ratio_loss for b in self.blocks if getattr(b, "last_ratio_loss", None) is not None]
        return self.ratio_loss_weight * torch.stack(losses).mean() if losses else None
