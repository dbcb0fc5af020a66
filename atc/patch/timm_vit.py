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
the token itself: exact for K-Medoids, which selects tokens, a size-weighted mean otherwise), also with timm's
RoPE ViTs (``Eva`` with ``attn_type='rope'``: ``AttentionRope``, grouped-query K/V heads included), and
attention pooling (``global_pool='map'``, SigLIP): the pooling query gets ``log(size)`` added to its logits, so a
merged token weighs as the tokens it holds (exact with nothing merged). In a block that
merges, or once tokens have sizes, attention runs through ``F.scaled_dot_product_attention`` with ``log(size)``
as additive mask (proportional attention); a block with nothing to do runs timm's own forward. One forward
serves the four block classes (their layout is a class constant), and blocks of one class share one patched
class, so ``torch.compile`` traces the model as one graph.

Placement, as in the published models: ATC and ToMe merge inside each block after the attention residual, before
the MLP (the metric is that attention's keys); K-Medoids and DPC-KNN reduce the block input before the block. Unsupported variants (``global_pool='prr'``,
attention pooling with its own position embedding, parallel blocks, other attention layers, EVA's mixed RoPE)
raise at patch time.

NaFlexViT (``NaFlexVit``: native aspect ratios, a padded batch of variable patch counts with ``patch_valid``):
the patch mask reaches the first block as the padding mask of :mod:`atc.patch.common`, so padding never merges
with real patches and every sample's real patches are merged as if it were run alone (the same ``r`` per block,
capped at what its own patch count allows); padding has size 0 (``log(size)`` masks it in attention), each
sample keeps its own rotary table (merged with its tokens), and pooling is size-weighted over the real tokens
(attention pooling adds ``log(size)``). A custom ``attn_mask`` passed to a NaFlexVit cannot follow merged tokens
and raises once tokens merge. ``forward_features`` returns the ``patch_valid`` of the merged tokens.

Gradient checkpointing (``model.set_grad_checkpointing(True)``) works with every method: see
:mod:`atc.patch.common`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc.patch.common import (BlockStep, MergeState, check_options, patch_blocks, patch_model, remove_patch,
                              replaying, resolve_proportional_attn, weighted_pool)

__all__ = ["apply_patch", "remove_patch"]

MODULE_NAME = "timm_vit"


# --------------------------------------------------------------------------------------------------------------
# Attention: timm's computation, plus proportional attention, the merge metric and K-Medoids' weights
# --------------------------------------------------------------------------------------------------------------
def _qkv_timm(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _qkv_eva(attn: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from timm.layers import apply_rot_embed_cat

    """``EvaAttention``'s and ``AttentionRope``'s projections, q/k-norm and rotary embedding (prefix tokens
    unrotated); grouped-query K/V heads (``AttentionRope``'s ``num_kv_heads``) are repeated to the query heads."""
    b, n, _ = x.shape
    q_bias = getattr(attn, "q_bias", None)  # EvaAttention only
    if attn.qkv is not None:
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def _stale(attn_mask: Tensor | None, num_tokens: int) -> bool:
    """Whether ``attn_mask`` was made for the tokens before a merge (another token count)."""
    return attn_mask is not None and attn_mask.shape[-1] != num_tokens


def _attend(block: nn.Module, x: Tensor, step: BlockStep, rope: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> tuple[Tensor, Tensor | None]:
    """timm's attention forward on ``x (B, T, C)`` with ``log(size)`` as additive mask (proportional attention).

    Returns ``(output (B, T, C), metric (B, T, C') or None)``: the merge metric (keys/queries/values averaged
    over heads) when this block merges after attention. For K-Medoids it also records, on the state, the
    attention each token received (SDPA does not return the weights, so they are recomputed, only in the
    block before a reduction).
    """
    state: MergeState = block._atc_state
    attn = block.attn
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv_eva(attn, x, rope) if block._atc_eva else _qkv_timm(attn, x)
    bias = state.attention_bias(q.dtype)
    if (bias is not None and (is_causal or attn_mask is not None)) or _stale(attn_mask, n):
        # the model's own padding mask (NaFlexViT's, from its patch mask) is rebuilt from the merge state, or masks
        # nothing in a batch without padding; any other mask cannot follow merged tokens
        if not state.model_mask:
            raise ValueError("a user attention mask cannot be combined with merged tokens (their count changes)")
        attn_mask = None
    if bias is not None:
        attn_mask, is_causal = bias, False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal
    )
    if step.attention_received:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits + attn_mask
        state.attn_received = state.query_weights(logits.softmax(dim=-1)).sum(dim=1).sum(dim=1).detach()
    metric = None
    if step.in_r and state.metric != "x":
        metric = {"keys": k, "queries": q, "values": v}[state.metric].mean(dim=1)
    out = out.transpose(1, 2).reshape(b, n, -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric


# --------------------------------------------------------------------------------------------------------------
# Blocks: one forward for Block, ResPostBlock, EvaBlock and EvaBlockPostNorm
# --------------------------------------------------------------------------------------------------------------
def _layer_scale(block: nn.Module, h: Tensor, which: int) -> Tensor:
    """LayerScale of a pre-norm block: timm's ``ls1``/``ls2`` modules, EVA's optional ``gamma_1``/``gamma_2``."""
    if block._atc_eva:
        gamma = block.gamma_1 if which == 1 else block.gamma_2
        return h if gamma is None else gamma * h
    return (block.ls1 if which == 1 else block.ls2)(h)


def _merge(block: nn.Module, x: Tensor, metric: Tensor, r: int, weight: Tensor | None,
           rope: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Remove ``r`` tokens from ``x`` and carry EVA's rotary table ``rope`` along (merged like the tokens:
    selected for K-Medoids, a size-weighted mean otherwise); returns ``(x, rope)``."""
    state: MergeState = block._atc_state
    size = state.size
    x, m = state.merge(x, metric, r, weight)
    if rope is not None:
        bsz, p = x.shape[0], state.protected
        if rope.dim() == 2:  # (N, D): one table for the batch
            rope = rope.unsqueeze(0).expand(bsz, -1, -1)
        elif rope.dim() == 4:  # (B, 1, N, D): per sample, after a merge or timm's patch dropout
            rope = rope[:, 0]
        elif rope.dim() != 3:
            raise ValueError(f"unsupported rotary table of shape {tuple(rope.shape)}: expected (N, D) or (B, 1, N, D)")
        padded = torch.cat([rope.new_zeros(bsz, p, rope.shape[-1]), rope], dim=1)
        weight = size if size is not None else rope.new_ones(bsz, padded.shape[1], 1)
        rope = m.merge(padded, weight.to(rope.dtype))[:, p:].unsqueeze(1)
        state.rope = rope
    return x, rope


def _run_block(self: nn.Module, x: Tensor, rope: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """The patched block on ``x (B, T, C)``, returning ``(B, T - r, C)``; run again from the state it started from
    when gradient checkpointing recomputes it (:meth:`MergeState.replay`)."""
    state: MergeState = self._atc_state
    if replaying():
        with state.replay(self._atc_index) as step:
            return _block_step(self, x, step, rope, attn_mask, is_causal)
    step = state.enter(self._atc_index, x, state.pending_valid)
    return _block_step(self, x, step, rope, attn_mask, is_causal)


def _block_step(self: nn.Module, x: Tensor, step: BlockStep, rope: Tensor | None, attn_mask: Tensor | None,
                is_causal: bool) -> Tensor:
    """Reduce the input (K-Medoids, DPC-KNN) or merge after the attention residual (ATC, ToMe), with proportional
    attention; the original forward where none of it applies (:attr:`BlockStep.plain`)."""
    state: MergeState = self._atc_state
    if state.rope is not None:
        rope = state.rope
    if step.plain:
        if _stale(attn_mask, x.shape[1]):
            if not state.model_mask:
                raise ValueError("a user attention mask cannot be combined with merged tokens (their count changes)")
            attn_mask = None  # NaFlexVit's own mask of a batch without padding: it masks nothing
        if self._atc_eva:
            return self._atc_base.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return self._atc_base.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    if step.pre_r:
        # DPC-KNN merges with learnable weights exp(Linear(C -> 1)(x)), uniform at initialisation
        weight = self.atc_token_score(x).exp() if state.method == "dpcknn" else None
        x, rope = _merge(self, x, x, step.pre_r, weight, rope)
    block_input = x
    if self._atc_post_norm:
        h, metric = _attend(self, x, step, rope, attn_mask, is_causal)
        x = x + self.drop_path1(self.norm1(h))
    else:
        h, metric = _attend(self, self.norm1(x), step, rope, attn_mask, is_causal)
        x = x + self.drop_path1(_layer_scale(self, h, 1))
    if step.in_r:
        x, rope = _merge(self, x, block_input if metric is None else metric, step.in_r, None, rope)
    if self._atc_post_norm:
        return x + self.drop_path2(self.norm2(self.mlp(x)))
    return x + self.drop_path2(_layer_scale(self, self.mlp(self.norm2(x)), 2))


def _block_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``forward`` of patched ``Block``/``ResPostBlock`` (timm's signature)."""
    return _run_block(self, x, None, attn_mask, is_causal)


def _eva_block_forward(self: nn.Module, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                       is_causal: bool = False) -> Tensor:
    """``forward`` of patched ``EvaBlock``/``EvaBlockPostNorm`` (EVA's signature, with the rotary table)."""
    return _run_block(self, x, rope, attn_mask, is_causal)


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def _pool_merged(model: nn.Module, x: Tensor, pool_type: str | None) -> Tensor | None:
    """Pooling of merged tokens ``x (B, T, C)``, or ``None`` when nothing was merged (the model's own pooling
    applies): size-weighted averages (padding has size 0), maxima over real tokens, and attention pooling
    (``global_pool='map'``) with ``log(size)`` added to the pooling query's logits, so a merged token weighs as the
    tokens it holds (and padding not at all)."""
    state: MergeState = model._atc_state
    size, valid = state.size, state.valid
    if size is None or size.shape[1] != x.shape[1]:
        return None
    include_prefix = bool(getattr(model, "pool_include_prefix", model.attn_pool is not None))
    if model.attn_pool is not None:
        bias = size.to(x.dtype).log()[:, None, None, :, 0]
        if valid is not None:
            bias = bias.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min)
        if not include_prefix:  # VisionTransformer and NaFlexVit pool patch tokens only
            x, bias = x[:, model.num_prefix_tokens:], bias[..., model.num_prefix_tokens:]
        # the query attends to a merged token as to the `size` identical tokens it stands for
        return model.attn_pool(x, attn_mask=bias)
    pool_type = model.global_pool if pool_type is None else pool_type
    if pool_type in ("avg", "max", "avgmax"):
        return weighted_pool(x, size, pool_type, model.num_prefix_tokens, include_prefix, valid)
    return None


def _model_pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm's ``pool`` (VisionTransformer, Eva) on merged tokens, see :func:`_pool_merged`."""
    pooled = _pool_merged(self, x, pool_type)
    return self._atc_base.pool(self, x, pool_type) if pooled is None else pooled


def _naflex_pool(self: nn.Module, x: Tensor, pool_type: str | None = None,
                 patch_valid: Tensor | None = None) -> Tensor:
    """NaFlexVit's ``_pool`` on merged tokens (its ``patch_valid`` is replaced by the merge state's mask)."""
    pooled = _pool_merged(self, x, pool_type)
    return self._atc_base._pool(self, x, pool_type, patch_valid) if pooled is None else pooled


def _naflex_forward_embeds(self: nn.Module, x: Any, patch_coord: Tensor | None, patch_valid: Tensor | None,
                           attn_mask: Tensor | None) -> dict[str, Any]:
    """NaFlexVit's embedding step, handing its patch mask (after patch dropout) to the first block as the padding
    mask. A custom ``attn_mask`` is not a padding mask: the blocks then raise once tokens merge. A batch without
    padding runs unmasked, exactly as the same images would outside NaFlex mode (this reads the mask on the host,
    as NaFlex mode's own grid sizes do)."""
    embeds = self._atc_base._forward_embeds(self, x, patch_coord, patch_valid, attn_mask)
    valid = embeds.get("patch_valid")
    state: MergeState = self._atc_state
    state.model_mask = attn_mask is None  # the blocks' mask is then NaFlexVit's own, made from patch_valid
    if valid is not None and attn_mask is None and not state.merges_nothing() and not bool(valid.all()):
        bsz, p = valid.shape[0], self.num_prefix_tokens
        valid = torch.cat([valid.new_ones(bsz, p, dtype=torch.bool), valid.bool()], dim=1)
    else:
        valid = None
    state.pending_valid = valid
    return embeds


def _naflex_forward_features(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """NaFlexVit's ``forward_features``; in NaFlex mode its ``patch_valid`` is that of the merged tokens."""
    out = self._atc_base.forward_features(self, *args, **kwargs)
    valid = self._atc_state.valid
    if isinstance(out, dict) and valid is not None and valid.shape[1] == out["patches"].shape[1]:
        out = {**out, "patch_valid": valid[:, self.num_prefix_tokens:]}
    return out


def _check_supported(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """Return (model kind: "vit", "eva" or "naflex", blocks); raise naming the option when the model cannot be
    patched exactly."""
    from timm.layers.attention import Attention, AttentionRope
    from timm.layers.attention_pool import AttentionPoolLatent
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

    if getattr(model, "_atc_patch_module", None) is not None:
        raise ValueError("model is already patched: call atc.patch.remove(model) first")
    if isinstance(model, VisionTransformer):
        kind, block_types, attn_types = "vit", (Block, ResPostBlock), (Attention,)
    elif isinstance(model, Eva):
        kind, block_types, attn_types = "eva", (EvaBlock, EvaBlockPostNorm), (EvaAttention, AttentionRope)
        if getattr(model, "rope_mixed", False):
            raise ValueError("unsupported timm option: EVA with rope_type='mixed' (depth-dependent rotary tables)")
    elif isinstance(model, NaFlexVit):
        kind = "naflex"
        block_types = (Block, ResPostBlock, EvaBlock, EvaBlockPostNorm)
        attn_types = (Attention, EvaAttention, AttentionRope)
        if model.rope_is_mixed:
            raise ValueError("unsupported timm option: NaFlexVit with rope_type='mixed' (depth-dependent rotary "
                             "tables)")
    else:
        raise TypeError(
            f"atc.patch.timm supports timm VisionTransformer, Eva and NaFlexVit models, got {type(model).__name__}; "
            f"use atc.patch.swag for torchvision's VisionTransformer"
        )
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        if type(attn_pool) is not AttentionPoolLatent:
            raise ValueError(
                f"unsupported timm option: global_pool={model.global_pool!r} ({type(attn_pool).__name__}); "
                f"supported: 'map' (AttentionPoolLatent), 'token', 'avg', 'max', 'avgmax'"
            )
        if attn_pool.pos_embed is not None:
            raise ValueError("unsupported timm option: attention pooling with pos_embed='abs' (one position "
                             "embedding per input token cannot follow merged tokens)")
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
    return kind, blocks


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
    """Patch a timm ViT in place so that every block can remove ``model.r`` tokens.

    Args:
        model: a timm ``VisionTransformer`` (incl. DeiT distilled, DeiT-III, register-token and MAE ViTs),
            ``Eva`` or ``NaFlexVit`` (padded batches of variable patch counts: see the module docstring).
        method: ``"atc"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"`` (see :data:`atc.merge.MERGE_METHODS`).
        linkage: ATC linkage: ``"single"``, ``"complete"`` or ``"average"``.
        proportional_attn: add ``log(size)`` to the attention logits (proportional attention); default ``True``.
        trace_source: track, for every input token, the output token it ends in
            (``model._atc_info["token_map"]``, ``(B, N)`` with N including prefix tokens).
        backend: clustering backend for ATC (``"auto"`` picks the compiled one on CPU).
        metric: what tokens are compared by: ``"keys"`` (mean over heads; the paper), ``"queries"``,
            ``"values"`` or ``"x"`` (the block input).
        layout: token order after a merge: ``"published"`` (each method's published layout: ToMe's
            ``[protected, unmerged sources, destinations]``, what official ToMe and the paper's models compute)
            or ``"spatial"`` (merged tokens in the order of their first patch). Only ToMe's results depend on it.
        prop_attn: ToMe's name for ``proportional_attn`` (``tome.patch.timm(model, prop_attn=True)``), accepted so
            ToMe code runs unchanged; giving both with different values raises ``TypeError``.

    Returns:
        the same model; ``model.r`` defaults to 0 (identical to the unpatched model).
    """
    check_options(method, linkage, metric, backend)
    proportional_attn = resolve_proportional_attn(proportional_attn, prop_attn)
    kind, blocks = _check_supported(model)
    state = MergeState(
        method=method, linkage=linkage, proportional_attn=proportional_attn, trace_source=trace_source, backend=backend,
        metric=metric, layout=layout, protected=int(model.num_prefix_tokens), depth=len(blocks),
    )
    patch_blocks(blocks, state, lambda blk: _BLOCK_MEMBERS[type(blk).__name__], score_dim=model.embed_dim)
    return patch_model(model, state, MODULE_NAME, _NAFLEX_MEMBERS if kind == "naflex" else {"pool": _model_pool})


#: Overrides of a patched NaFlexVit: the patch mask to the merge state, merged pooling, merged ``patch_valid``.
_NAFLEX_MEMBERS = {"_forward_embeds": _naflex_forward_embeds, "_pool": _naflex_pool,
                   "forward_features": _naflex_forward_features}

#: Class members of each patched block class: the shared forward with its signature, and the layout constants
#: it branches on (class attributes, the same for every block of a class: no per-block compile guards).
_BLOCK_MEMBERS = {
    "Block": {"forward": _block_forward, "_atc_eva": False, "_atc_post_norm": False},
    "ResPostBlock": {"forward": _block_forward, "_atc_eva": False, "_atc_post_norm": True},
    "EvaBlock": {"forward": _eva_block_forward, "_atc_eva": True, "_atc_post_norm": False},
    "EvaBlockPostNorm": {"forward": _eva_block_forward, "_atc_eva": True, "_atc_post_norm": True},
}
