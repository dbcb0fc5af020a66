"""Token merging for torchvision's ``VisionTransformer`` (the SWAG architecture), in place.

    import atc.patch, torchvision
    model = torchvision.models.vit_b_16(image_size=384)
    atc.patch.swag(model, method="atc", linkage="average")
    model.r = 8

In a block that merges (or, with proportional attention, once tokens have been merged), the encoder block's
``nn.MultiheadAttention`` is evaluated with ``F.scaled_dot_product_attention`` on its own in/out projections
(torchvision's result up to rounding) so that ``log(size)`` can be added as mask and the keys read as merge
metric; other blocks run torchvision's own forward. ATC/ToMe merge after the attention residual;
K-Medoids/DPC-KNN reduce the block input. The class token is protected. The patch's wiring (state, block
classes, ``model.r``, removal) is :mod:`atc.patch.common`'s, shared with the timm patcher.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from atc.patch.common import (BlockStep, MergeState, check_options, patch_blocks, patch_model, remove_patch,
                              replaying, resolve_proportional_attn)

__all__ = ["apply_patch", "remove_patch"]

MODULE_NAME = "torchvision_vit"


def _attention(block: nn.Module, x: Tensor, state: MergeState, step: BlockStep) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention(x, x, x)`` on ``x (B, T, C)`` via SDPA with proportional attention.

    Returns ``(output (B, T, C), metric (B, T, C / heads) or None)``; the metric only when the block merges
    after attention. For K-Medoids it records on the state the attention each token received.
    """
    mha: nn.MultiheadAttention = block.self_attention
    b, n, c = x.shape
    heads = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    bias = state.attention_bias(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=mha.dropout if mha.training else 0.0)
    if step.attention_received:
        logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        if bias is not None:
            logits = logits + bias
        state.attn_received = logits.softmax(-1).sum(1).sum(1).detach()
    metric = None
    if step.in_r and state.metric != "x":
        metric = {"keys": k, "queries": q, "values": v}[state.metric].mean(1)
    out = out.transpose(1, 2).reshape(b, n, c)
    return mha.out_proj(out), metric


def _block_forward(self: nn.Module, input: Tensor) -> Tensor:
    """The patched ``EncoderBlock`` on ``input (B, T, C)``, returning ``(B, T - r, C)``; run again from the state
    it started from when a gradient checkpoint recomputes it (:meth:`MergeState.replay`)."""
    state: MergeState = self._atc_state
    if replaying():
        with state.replay(self._atc_index) as step:
            return _block_step(self, input, step)
    return _block_step(self, input, state.enter(self._atc_index, input))


def _block_step(self: nn.Module, input: Tensor, step: BlockStep) -> Tensor:
    """Reduce the input (K-Medoids, DPC-KNN) or merge after the attention residual (ATC, ToMe); torchvision's
    forward where none of it applies."""
    state: MergeState = self._atc_state
    if step.plain:
        return self._atc_base.forward(self, input)
    if step.pre_r:
        weight = self.atc_token_score(input).exp() if state.method == "dpcknn" else None
        input, _ = state.merge(input, input, step.pre_r, weight)
    attn_out, metric = _attention(self, self.ln_1(input), state, step)
    x = self.dropout(attn_out) + input
    if step.in_r:
        x, _ = state.merge(x, input if metric is None else metric, step.in_r)
    return x + self.mlp(self.ln_2(x))


def apply_patch(
    model: nn.Module,
    method: str = "atc",
    linkage: str = "average",
    proportional_attn: bool | None = None,
    trace_source: bool = False,
    backend: str = "auto",
    metric: str = "keys",
    layout: str = "published",
    *,
    prop_attn: bool | None = None,
) -> nn.Module:
    """Patch a torchvision ``VisionTransformer`` in place; arguments as :func:`atc.patch.timm_vit.apply_patch`
    (``prop_attn`` is ToMe's name for ``proportional_attn``)."""
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    check_options(method, linkage, metric, backend)
    proportional_attn = resolve_proportional_attn(proportional_attn, prop_attn)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"atc.patch.swag expects torchvision's VisionTransformer, got {type(model).__name__}")
    if getattr(model, "_atc_patch_module", None) is not None:
        raise ValueError("model is already patched: call atc.patch.remove(model) first")
    layers = list(model.encoder.layers)
    for i, blk in enumerate(layers):
        if type(blk) is not EncoderBlock:
            raise ValueError(f"unsupported torchvision block {type(blk).__name__} at layer {i}")
        if not blk.self_attention._qkv_same_embed_dim or not blk.self_attention.batch_first:
            raise ValueError(f"unsupported nn.MultiheadAttention configuration at layer {i}")
    state = MergeState(method=method, linkage=linkage, proportional_attn=proportional_attn,
                       trace_source=trace_source, backend=backend, metric=metric, layout=layout, protected=1, depth=len(layers))
    patch_blocks(layers, state, lambda _blk: _BLOCK_MEMBERS, score_dim=model.hidden_dim)
    return patch_model(model, state, MODULE_NAME)


_BLOCK_MEMBERS = {"forward": _block_forward}
