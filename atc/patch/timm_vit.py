"""Token merging for timm Vision Transformers (``VisionTransformer`` and its subclasses, ``Eva``), in place.

    import atc.patch, timm
    model = timm.create_model("deit_small_patch16_224")
    atc.patch.timm(model, method="atc", linkage="average")   # or method="tome", "kmedoids", "dpcknn"
    model.r = 16                 # or [r0, r1, ...], or (16, "decrease")
    logits = model(images)
    model._atc_info["tokens"]    # token count after every block

Supported timm options (the patched forward reproduces timm's exactly when ``r == 0``): LayerScale
(``ls1``/``ls2``, EVA's ``gamma_1``/``gamma_2``), q/k-norm, scale-norm and gated attention, attention/MLP
biases, any number of prefix tokens (class, distillation, register tokens: all protected from merging),
``class_token=False`` with ``global_pool="avg"|"max"|"avgmax"`` (averages become size-weighted),
``dynamic_img_size``, pre-norm (``Block``, ``EvaBlock``) and post-norm (``ResPostBlock``,
``EvaBlockPostNorm``) blocks, and EVA's rotary embeddings (the rotary table of a merged token is merged like
the token itself: exact for K-Medoids, which selects tokens, a size-weighted mean otherwise). Attention runs
through ``F.scaled_dot_product_attention`` with ``log(size)`` as additive mask (proportional attention).

Placement (REFERENCE §1): ATC and ToMe merge inside each block after the attention residual, before the MLP;
K-Medoids and DPC-KNN reduce the block input before the block. Unsupported variants (attention pooling
``global_pool="map"``, parallel blocks, other attention layers, EVA's mixed RoPE) raise at patch time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc.patch.common import (PRE_BLOCK_METHODS, MergeState, check_options, remove_patch, swap_class,
                              weighted_pool)

__all__ = ["apply_patch", "remove_patch"]

MODULE_NAME = "timm_vit"


# --------------------------------------------------------------------------------------------------------------
# Attention: timm's computation, plus proportional attention and the merge metric
# --------------------------------------------------------------------------------------------------------------
def _qkv_timm(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _qkv_eva(attn: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from timm.layers import apply_rot_embed_cat

    b, n, _ = x.shape
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    return q, k, v


def _attend(attn: nn.Module, x: Tensor, attn_mask: Tensor | None, is_causal: bool, rope: Tensor | None = None,
            eva: bool = False) -> Tensor:
    """timm's attention forward with ``log(size)`` added to the mask; stores the metric on the module."""
    state: MergeState = attn._atc_state
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv_eva(attn, x, rope) if eva else _qkv_timm(attn, x)
    bias = state.attention_bias(q.dtype)
    if bias is not None:
        if is_causal or attn_mask is not None:
            raise ValueError("a user attention mask cannot be combined with merged tokens (their count changes)")
        attn_mask = bias
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal
    )
    if state.wants_attention_at(attn._atc_index):
        # K-Medoids needs the attention each token *received*; SDPA does not return it, so recompute here
        # (only in the block before a reduction).
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits + attn_mask
        state.attn_received = logits.softmax(dim=-1).mean(dim=1).sum(dim=1).detach()
    if state.metric != "x":
        attn._atc_metric = {"keys": k, "queries": q, "values": v}[state.metric].mean(dim=1)
    out = out.transpose(1, 2).reshape(b, n, -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _attention_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    return _attend(self, x, attn_mask, is_causal)


def _eva_attention_forward(self: nn.Module, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                           is_causal: bool = False) -> Tensor:
    return _attend(self, x, attn_mask, is_causal, rope=rope, eva=True)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------
def _start(block: nn.Module, x: Tensor) -> MergeState:
    state: MergeState = block._atc_state
    if block._atc_index == 0 or not state.r_list:
        state.reset(x.shape[1], x.shape[0], x.device)
        state.rope = None
    return state


def _pre_merge(block: nn.Module, state: MergeState, x: Tensor) -> Tensor:
    """K-Medoids / DPC-KNN: reduce the block input (REFERENCE §1)."""
    if state.method not in PRE_BLOCK_METHODS:
        return x
    weight = None
    if state.method == "dpcknn":
        # learnable merge weights exp(Linear(C -> 1)(x)), uniform at initialisation (zero weights)
        weight = block.atc_token_score(x).exp()
    x_new, m = state.merge(block._atc_index, x, x, weight)
    _merge_rope(state, m, x)
    return x_new


def _in_merge(block: nn.Module, state: MergeState, x: Tensor, block_input: Tensor) -> Tensor:
    """ATC / ToMe: merge after the attention residual, before the MLP."""
    if state.method in PRE_BLOCK_METHODS:
        return x
    metric = block_input if state.metric == "x" else block.attn._atc_metric
    block.attn._atc_metric = None
    x_new, m = state.merge(block._atc_index, x, metric)
    _merge_rope(state, m, x)
    return x_new


def _merge_rope(state: MergeState, m: Any, x: Tensor) -> None:
    """Carry EVA's rotary table along with the tokens: merged like the tokens (selected for K-Medoids)."""
    rope = getattr(state, "rope_full", None)
    if m is None or rope is None:
        return
    rope = state.rope if state.rope is not None else rope
    b, p = x.shape[0], state.protected
    if rope.dim() == 2:
        rope = rope.unsqueeze(0).expand(b, -1, -1)
    elif rope.dim() == 4:  # (B, 1, N, D) after timm's patch dropout
        rope = rope[:, 0]
    padded = torch.cat([rope.new_zeros(b, p, rope.shape[-1]), rope], dim=1)
    size = state._prev_size if state._prev_size is not None else x.new_ones(b, x.shape[1], 1)
    merged = m.merge(padded, size.to(rope.dtype))
    state.rope = merged[:, p:].unsqueeze(1)


def _block_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    state = _start(self, x)
    state._prev_size = state.size
    x = _pre_merge(self, state, x)
    block_input = x
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    state._prev_size = state.size
    x = _in_merge(self, state, x, block_input)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _res_post_block_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None,
                            is_causal: bool = False) -> Tensor:
    state = _start(self, x)
    state._prev_size = state.size
    x = _pre_merge(self, state, x)
    block_input = x
    x = x + self.drop_path1(self.norm1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal)))
    state._prev_size = state.size
    x = _in_merge(self, state, x, block_input)
    return x + self.drop_path2(self.norm2(self.mlp(x)))


def _eva_rope(state: MergeState, rope: Tensor | None) -> Tensor | None:
    if state.rope_full is None:
        state.rope_full = rope
    return state.rope if state.rope is not None else rope


def _eva_block_forward(self: nn.Module, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                       is_causal: bool = False) -> Tensor:
    state = _start(self, x)
    if self._atc_index == 0:
        state.rope_full = rope
    state._prev_size = state.size
    x = _pre_merge(self, state, x)
    rope = _eva_rope(state, rope)
    block_input = x
    x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = x + self.drop_path1(x_attn)
    state._prev_size = state.size
    x = _in_merge(self, state, x, block_input)
    x_mlp = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    return x + self.drop_path2(x_mlp)


def _eva_post_block_forward(self: nn.Module, x: Tensor, rope: Tensor | None = None,
                            attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    state = _start(self, x)
    if self._atc_index == 0:
        state.rope_full = rope
    state._prev_size = state.size
    x = _pre_merge(self, state, x)
    rope = _eva_rope(state, rope)
    block_input = x
    x = x + self.drop_path1(self.norm1(self.attn(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)))
    state._prev_size = state.size
    x = _in_merge(self, state, x, block_input)
    return x + self.drop_path2(self.norm2(self.mlp(x)))


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def _model_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: MergeState = self._atc_state
    state.r = self.r
    state.r_list = []
    state.rope_full = None
    out = self._atc_orig_class.forward(self, *args, **kwargs)
    state.finish()
    self._atc_info = state.info()
    return out


def _model_pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
    state: MergeState = self._atc_state
    pool_type = self.global_pool if pool_type is None else pool_type
    if pool_type in ("avg", "max", "avgmax") and state.size is not None and state.size.shape[1] == x.shape[1]:
        return weighted_pool(x, state.size, pool_type, self.num_prefix_tokens,
                             bool(getattr(self, "pool_include_prefix", False)))
    return self._atc_orig_class.pool(self, x, pool_type)



def _check_supported(model: nn.Module) -> tuple[bool, list[nn.Module]]:
    """Return (is_eva, blocks); raise naming the option when the model cannot be patched exactly."""
    from timm.layers.attention import Attention
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

    if getattr(model, "_atc_patch_module", None) is not None:
        raise ValueError("model is already patched: call atc.patch.remove(model) first")
    if isinstance(model, VisionTransformer):
        is_eva, block_types, attn_types = False, (Block, ResPostBlock), (Attention,)
    elif isinstance(model, Eva):
        is_eva, block_types, attn_types = True, (EvaBlock, EvaBlockPostNorm), (EvaAttention,)
        if getattr(model, "rope_mixed", False):
            raise ValueError("unsupported timm option: EVA with rope_type='mixed' (depth-dependent rotary tables)")
    else:
        raise TypeError(
            f"atc.patch.timm supports timm VisionTransformer and Eva models, got {type(model).__name__}; "
            f"use atc.patch.swag for torchvision's VisionTransformer"
        )
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(
            f"unsupported timm option: global_pool={model.global_pool!r} (attention pooling); use 'token' or 'avg'"
        )
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        if type(blk) not in block_types:
            raise ValueError(
                f"unsupported timm option: block_fn={type(blk).__name__} (block {i}); supported blocks: "
                f"{', '.join(t.__name__ for t in block_types)}"
            )
        if type(blk.attn) not in attn_types:
            raise ValueError(
                f"unsupported timm option: attn_layer={type(blk.attn).__name__} (block {i}); supported: "
                f"{', '.join(t.__name__ for t in attn_types)}"
            )
    return is_eva, blocks


def apply_patch(
    model: nn.Module,
    method: str = "atc",
    linkage: str = "average",
    prop_attn: bool = True,
    trace_source: bool = False,
    backend: str = "auto",
    metric: str = "keys",
) -> nn.Module:
    """Patch a timm ViT in place so that every block can remove ``model.r`` tokens.

    Args:
        model: a timm ``VisionTransformer`` (incl. DeiT distilled, DeiT-III, register-token and MAE ViTs) or
            ``Eva``.
        method: ``"atc"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"`` (see :data:`atc.merge.MERGE_METHODS`).
        linkage: ATC linkage: ``"single"``, ``"complete"`` or ``"average"``.
        prop_attn: add ``log(size)`` to the attention logits (proportional attention).
        trace_source: track, for every input token, the output token it ends in
            (``model._atc_info["token_map"]``, ``(B, N)`` with N including prefix tokens).
        backend: clustering backend for ATC (``"auto"`` picks the compiled one on CPU).
        metric: what tokens are compared by: ``"keys"`` (mean over heads; the paper), ``"queries"``,
            ``"values"`` or ``"x"`` (the block input).

    Returns:
        the same model; ``model.r`` defaults to 0 (identical to the unpatched model).
    """
    check_options(method, linkage, metric)
    is_eva, blocks = _check_supported(model)
    state = MergeState(
        method=method, linkage=linkage, prop_attn=prop_attn, trace_source=trace_source, backend=backend,
        metric=metric, protected=int(model.num_prefix_tokens), depth=len(blocks),
    )
    state.rope = None
    state.rope_full = None
    state._prev_size = None
    if is_eva:
        block_fwd = {"EvaBlock": _eva_block_forward, "EvaBlockPostNorm": _eva_post_block_forward}
        attn_fwd = _eva_attention_forward
    else:
        block_fwd = {"Block": _block_forward, "ResPostBlock": _res_post_block_forward}
        attn_fwd = _attention_forward
    for i, blk in enumerate(blocks):
        blk._atc_state = state
        blk._atc_index = i
        blk.attn._atc_state = state
        blk.attn._atc_index = i
        blk.attn._atc_metric = None
        if method == "dpcknn":
            dim = blk.norm1.weight.shape[0] if getattr(blk.norm1, "weight", None) is not None else model.embed_dim
            score = nn.Linear(dim, 1)
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
            blk.atc_token_score = score.to(next(model.parameters()).device)
        swap_class(blk, {"forward": block_fwd[type(blk).__name__]})
        swap_class(blk.attn, {"forward": attn_fwd})
    model._atc_state = state
    model._atc_info = {}
    model.r = 0
    swap_class(model, {"forward": _model_forward, "pool": _model_pool})
    model._atc_patch_module = MODULE_NAME
    return model
