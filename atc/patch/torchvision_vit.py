"""Token merging for torchvision's ``VisionTransformer`` (the SWAG architecture), in place.

    import atc.patch, torchvision
    model = torchvision.models.vit_b_16(image_size=384)
    atc.patch.swag(model, method="atc", linkage="average")
    model.r = 8

The encoder blocks' ``nn.MultiheadAttention`` is evaluated with ``F.scaled_dot_product_attention`` on its own
in/out projections (identical to torchvision's result at r = 0) so that ``log(size)`` can be added as mask and
the keys read as merge metric. ATC/ToMe merge after the attention residual; K-Medoids/DPC-KNN reduce the block
input. The class token is protected.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from atc.patch.common import PRE_BLOCK_METHODS, MergeState, check_options, remove_patch, swap_class

__all__ = ["apply_patch", "remove_patch"]

MODULE_NAME = "torchvision_vit"


def _attention(block: nn.Module, x: Tensor, state: MergeState) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention(x, x, x)`` via SDPA with proportional attention; returns (output, metric)."""
    mha: nn.MultiheadAttention = block.self_attention
    b, n, c = x.shape
    heads = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    bias = state.attention_bias(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=mha.dropout if mha.training else 0.0)
    if state.wants_attention_at(block._atc_index):
        logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        if bias is not None:
            logits = logits + bias
        state.attn_received = logits.softmax(-1).mean(1).sum(1).detach()
    metric = None if state.metric == "x" else {"keys": k, "queries": q, "values": v}[state.metric].mean(1)
    out = out.transpose(1, 2).reshape(b, n, c)
    return mha.out_proj(out), metric


def _block_forward(self: nn.Module, input: Tensor) -> Tensor:
    state: MergeState = self._atc_state
    if self._atc_index == 0:
        state.reset(input.shape[1], input.shape[0], input.device)
    i = self._atc_index
    if state.method in PRE_BLOCK_METHODS:
        weight = self.atc_token_score(input).exp() if state.method == "dpcknn" else None
        input, _ = state.merge(i, input, input, weight)
    attn_out, metric = _attention(self, self.ln_1(input), state)
    x = self.dropout(attn_out) + input
    if state.method not in PRE_BLOCK_METHODS:
        x, _ = state.merge(i, x, input if metric is None else metric)
    return x + self.mlp(self.ln_2(x))


def _model_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: MergeState = self._atc_state
    state.r = self.r
    out = self._atc_orig_class.forward(self, *args, **kwargs)
    state.finish()
    self._atc_info = state.info()
    return out



def apply_patch(
    model: nn.Module,
    method: str = "atc",
    linkage: str = "average",
    prop_attn: bool = True,
    trace_source: bool = False,
    backend: str = "auto",
    metric: str = "keys",
) -> nn.Module:
    """Patch a torchvision ``VisionTransformer`` in place; arguments as :func:`atc.patch.timm_vit.apply_patch`."""
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    check_options(method, linkage, metric)
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
    state = MergeState(method=method, linkage=linkage, prop_attn=prop_attn, trace_source=trace_source,
                       backend=backend, metric=metric, protected=1, depth=len(layers))
    for i, blk in enumerate(layers):
        blk._atc_state = state
        blk._atc_index = i
        if method == "dpcknn":
            score = nn.Linear(model.hidden_dim, 1).to(blk.ln_1.weight.device)
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
            blk.atc_token_score = score
        swap_class(blk, {"forward": _block_forward})
    model._atc_state = state
    model._atc_info = {}
    model.r = 0
    swap_class(model, {"forward": _model_forward})
    model._atc_patch_module = MODULE_NAME
    return model
