"""Token merging for Hugging Face ``transformers`` vision towers, in place (ToMe style).

    import atc.patch
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(local_dir)
    atc.patch.transformers(model, method="atc", linkage="average")   # or "tome", "kmedoids", "dpcknn"
    model.r = 8                     # or [r0, r1, ...], or (8, "decrease"): as atc.patch.timm
    out = model.get_image_features(pixel_values=images)
    model._atc_info["tokens"]       # token count after every layer
    atc.patch.remove(model)

Supported (``transformers`` 5.x): ``ViTModel``, ``ViTForImageClassification``, ``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, the vision tower of ``CLIPModel``, ``SiglipVisionModel``, the vision tower
of ``SiglipModel``, ``Siglip2VisionModel`` (NaFlex-style padded batches, ``pixel_attention_mask``), the vision
tower of ``Siglip2Model``, ``Dinov2Model``, ``Dinov2WithRegistersModel``. The class token (ViT, CLIP, DINOv2) and
register tokens are protected; SigLIP has none.

Padding (``attention_mask``): the mask the encoder layers receive (SigLIP 2 builds it from its
``pixel_attention_mask``) is read once per forward, at the first layer, as a key-padding mask (a key that no
query may attend is padding) and becomes the padding mask of :mod:`atc.patch.common`: padding never merges with
real tokens, every sample's real tokens are merged as if it were run alone, padding has size 0 in attention and
in SigLIP 2's pooling head. A mask that is not a key-padding mask (one that masks pairs, e.g. causal) cannot follow
merged tokens and raises, naming the option. Reading the mask synchronises with the device once per forward.

Gradient checkpointing (``model.gradient_checkpointing_enable()``) works with every method: a recomputed layer
runs from the state it started from (:mod:`atc.patch.common`).
With ``r = 0`` every layer runs its own forward (the output equals the unpatched model's). A layer that merges,
or that runs once tokens have sizes, evaluates its attention with ``F.scaled_dot_product_attention`` on the
layer's own projections with ``log(size)`` as additive mask (proportional attention), whatever
``attn_implementation`` the model was loaded with; ATC/ToMe merge after the attention residual, K-Medoids and
DPC-KNN reduce the layer input. SigLIP's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``) adds
``log(size)`` to its probe's logits, so a merged token weighs as the tokens it holds. What the towers pool is
otherwise the first token (ViT, CLIP, DINOv2), which is protected, so the heads need nothing else.

Not supported, failing with a message naming the option: ``output_attentions=True`` while tokens are merged
(the attention maps of merged layers have other sizes and are not computed), an ``attention_mask`` that is not a
key-padding mask while tokens are merged, and models whose head averages patch tokens without sizes
(``Dinov2ForImageClassification`` and its register variant, ``CLIPForImageClassification``,
``SiglipForImageClassification``, ``Siglip2ForImageClassification``) or reads a patch grid
(``ViTForMaskedImageModeling``). ``output_hidden_states=True`` works: the recorded states have the token counts
of their layers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc.patch.common import (BlockStep, MergeState, check_options, patch_blocks, patch_model, remove_patch,
                              replaying, resolve_proportional_attn, swap_class)

__all__ = ["apply_patch", "remove_patch", "SUPPORTED_MODELS"]

MODULE_NAME = "transformers_vit"

#: vision tower class -> (attribute path of its layer list, layer class, number of protected prefix tokens:
#: the class token and register tokens, from the config)
_TOWERS: dict[str, tuple[str, str, Callable[[Any], int]]] = {
    "ViTModel": ("layers", "ViTLayer", lambda config: 1),
    "CLIPVisionModel": ("encoder.layers", "CLIPEncoderLayer", lambda config: 1),
    "SiglipVisionModel": ("encoder.layers", "SiglipEncoderLayer", lambda config: 0),
    "Siglip2VisionModel": ("encoder.layers", "Siglip2EncoderLayer", lambda config: 0),
    "Dinov2Model": ("encoder.layer", "Dinov2Layer", lambda config: 1),
    "Dinov2WithRegistersModel": ("encoder.layer", "Dinov2WithRegistersLayer",
                                 lambda config: 1 + config.num_register_tokens),
}

#: model class -> attribute holding its vision tower (a class of :data:`_TOWERS`)
_WRAPPERS: dict[str, str] = {
    "ViTForImageClassification": "vit",
    "CLIPModel": "vision_model",
    "CLIPVisionModelWithProjection": "vision_model",
    "SiglipModel": "vision_model",
    "Siglip2Model": "vision_model",
}

#: model classes that are refused, and why
_REFUSED: dict[str, str] = {
    "Dinov2ForImageClassification": "its head averages the patch tokens without token sizes",
    "Dinov2WithRegistersForImageClassification": "its head averages the patch tokens without token sizes",
    "CLIPForImageClassification": "its head averages the patch tokens without token sizes",
    "SiglipForImageClassification": "its head averages the patch tokens without token sizes",
    "Siglip2ForImageClassification": "its head averages the patch tokens without token sizes",
    "ViTForMaskedImageModeling": "its decoder reshapes the tokens to the patch grid",
}

SUPPORTED_MODELS = tuple(_TOWERS) + tuple(_WRAPPERS)


class _Layout:
    """Where a layer class keeps its parts; a class constant of the patched layer class (no per-layer guards)."""

    def __init__(self, norm1: str, attn: str, out_proj: str, scale: str, dropout: str, norm2: str,
                 ls1: str | None = None, ls2: str | None = None, residual_drop: str | None = None) -> None:
        self.norm1, self.attn, self.out_proj, self.scale, self.dropout = norm1, attn, out_proj, scale, dropout
        self.norm2, self.ls1, self.ls2, self.residual_drop = norm2, ls1, ls2, residual_drop


_LAYOUTS = {
    "ViTLayer": _Layout("layernorm_before", "attention", "o_proj", "scaling", "attention_dropout",
                        "layernorm_after", residual_drop="dropout"),
    "CLIPEncoderLayer": _Layout("layer_norm1", "self_attn", "out_proj", "scale", "dropout", "layer_norm2"),
    "SiglipEncoderLayer": _Layout("layer_norm1", "self_attn", "out_proj", "scale", "dropout", "layer_norm2"),
    "Dinov2Layer": _Layout("norm1", "attention", "o_proj", "scaling", "attention_dropout", "norm2",
                           ls1="layer_scale1", ls2="layer_scale2", residual_drop="drop_path"),
}
_LAYOUTS["Dinov2WithRegistersLayer"] = _LAYOUTS["Dinov2Layer"]
_LAYOUTS["Siglip2EncoderLayer"] = _LAYOUTS["SiglipEncoderLayer"]


def _attention(layer: nn.Module, x: Tensor, state: MergeState, step: BlockStep) -> tuple[Tensor, Tensor | None]:
    """The layer's self-attention on ``x (B, T, C)`` via SDPA with ``log(size)`` as additive mask.

    Returns ``(output (B, T, C), metric (B, T, head_dim) or None)``: the merge metric (keys/queries/values
    averaged over heads) when the layer merges after attention. For K-Medoids it records on the state the
    attention each token received.
    """
    layout: _Layout = layer._atc_layout
    attn = getattr(layer, layout.attn)
    b, n, _ = x.shape
    shape = (b, n, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    scale = getattr(attn, layout.scale)
    bias = state.attention_bias(q.dtype)
    dropout = getattr(attn, layout.dropout) if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    if step.attention_received:
        logits = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias
        # summed over heads and the real queries, as timm's patch
        state.attn_received = state.query_weights(logits.softmax(-1)).sum(1).sum(1).detach()
    metric = None
    if step.in_r and state.metric != "x":
        metric = {"keys": k, "queries": q, "values": v}[state.metric].mean(1)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return getattr(attn, layout.out_proj)(out), metric


def _residual(layer: nn.Module, h: Tensor, ls: str | None) -> Tensor:
    """LayerScale (DINOv2) then the residual branch's dropout / drop path, as the layer applies them."""
    layout: _Layout = layer._atc_layout
    if ls is not None:
        h = getattr(layer, ls)(h)
    if layout.residual_drop is not None:
        h = getattr(layer, layout.residual_drop)(h)
    return h


def _padding_mask(attention_mask: Tensor | None, x: Tensor, protected: int) -> Tensor | None:
    """The padding mask ``(B, T)`` bool of the attention mask a layer receives, ``None`` without padding.

    transformers hands the layers a 4-D mask (bool, or additive float with the dtype's minimum at masked pairs)
    or, with flash attention, the 2-D ``(B, T)`` one. A key that no query may attend is padding; the mask must be
    exactly that key-padding mask (checked on the host), since merged tokens cannot follow any other, and the
    ``protected`` prefix tokens must be real.
    """
    if attention_mask is None:
        return None
    bsz, t = x.shape[0], x.shape[1]
    mask = attention_mask
    allowed = mask.bool() if mask.dtype == torch.bool or mask.dim() == 2 else mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() == 2:
        allowed = allowed[:, None, None, :]
    if allowed.dim() != 4 or allowed.shape[0] != bsz or allowed.shape[-1] != t:
        raise ValueError(f"unsupported attention_mask of shape {tuple(mask.shape)} with merged tokens: expected "
                         f"(B, 1, T, T), (B, 1, 1, T) or (B, T) for B={bsz}, T={t}")
    valid = allowed.any(dim=2).any(dim=1)
    if not torch.equal(allowed, valid[:, None, None, :].expand_as(allowed)):
        raise ValueError("an attention_mask that is not a key-padding mask (it masks pairs of tokens, not padding "
                         "tokens) cannot follow merged tokens: pass a padding mask, or set model.r = 0")
    if protected and not bool(valid[:, :protected].all()):
        raise ValueError(f"the attention_mask masks a class or register token (the first {protected} tokens, which "
                         f"are never merged and always count as real): mask padding tokens only")
    return None if bool(valid.all()) else valid


def _check_call(layer: nn.Module, kwargs: dict[str, Any]) -> None:
    config = getattr(getattr(layer, layer._atc_layout.attn), "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions=True is not supported with merged tokens (layers that merge do not "
                         "compute attention maps); set model.r = 0 to record them")


def _layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                   **kwargs: Any) -> Tensor:
    """The patched encoder layer on ``hidden_states (B, T, C)``, returning ``(B, T - r, C)``; run again from the
    state it started from when gradient checkpointing recomputes it (:meth:`MergeState.replay`)."""
    state: MergeState = self._atc_state
    if replaying():
        with state.replay(self._atc_index) as step:
            return _layer_step(self, hidden_states, attention_mask, kwargs, step)
    index = self._atc_index
    # the mask is read at the first layer, unless nothing merges (r = 0 runs the layers' own forwards, untouched)
    valid = None
    if index == 0 and not state.merges_nothing():
        valid = _padding_mask(attention_mask, hidden_states, state.protected)
    step = state.enter(index, hidden_states, valid)
    return _layer_step(self, hidden_states, attention_mask, kwargs, step)


def _layer_step(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any],
                step: BlockStep) -> Tensor:
    """Reduce the input (K-Medoids, DPC-KNN) or merge after the attention residual (ATC, ToMe), with proportional
    attention and the padding mask of the merge state; the layer's own forward where none of it applies
    (:attr:`BlockStep.plain`)."""
    state: MergeState = self._atc_state
    if step.plain:
        if attention_mask is not None and attention_mask.shape[-1] != hidden_states.shape[1]:
            # made for the tokens before a merge; checked at the first layer to mask nothing (a padded batch's
            # layers after a merge are never plain)
            attention_mask = None
        return self._atc_base.forward(self, hidden_states, attention_mask, **kwargs)
    _check_call(self, kwargs)
    layout: _Layout = self._atc_layout
    x = hidden_states
    if step.pre_r:
        # DPC-KNN merges with learnable weights exp(Linear(C -> 1)(x)), uniform at initialisation
        weight = self.atc_token_score(x).exp() if state.method == "dpcknn" else None
        x, _ = state.merge(x, x, step.pre_r, weight)
    block_input = x
    h, metric = _attention(self, getattr(self, layout.norm1)(x), state, step)
    x = x + _residual(self, h, layout.ls1)
    if step.in_r:
        x, _ = state.merge(x, block_input if metric is None else metric, step.in_r)
    h = self.mlp(getattr(self, layout.norm2)(x))
    return x + _residual(self, h, layout.ls2)


def _siglip_head_forward(self: nn.Module, hidden_state: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """SigLIP's and SigLIP 2's attention-pooling head with ``log(size)`` added to the probe's logits over merged
    tokens (padding, of size 0, masked; SigLIP 2's own mask, of the unmerged length, is then not used)."""
    state: MergeState = self._atc_state
    size = state.size
    if size is None or size.shape[1] != hidden_state.shape[1]:
        return self._atc_base.forward(self, hidden_state, *args, **kwargs)
    b = hidden_state.shape[0]
    probe = self.probe.repeat(b, 1, 1)
    # nn.MultiheadAttention's float mask is added to the logits; (B * heads, 1, T), batch-major
    bias = size.to(hidden_state.dtype).log()[:, None, :, 0]
    if state.valid is not None:
        bias = bias.masked_fill(~state.valid[:, None, :], torch.finfo(bias.dtype).min)
    bias = bias.repeat_interleave(self.attention.num_heads, dim=0)
    hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=bias, need_weights=False)[0]
    residual = hidden_state
    hidden_state = self.layernorm(hidden_state)
    hidden_state = residual + self.mlp(hidden_state)
    return hidden_state[:, 0]


def _vision_tower(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    if name in _REFUSED:
        raise ValueError(f"unsupported transformers model {name}: {_REFUSED[name]}; patch its vision tower "
                         f"({', '.join(_TOWERS)}) and pool it yourself")
    if name in _WRAPPERS:
        return getattr(model, _WRAPPERS[name])
    if name in _TOWERS:
        return model
    raise TypeError(f"atc.patch.transformers supports {', '.join(SUPPORTED_MODELS)}; got {name}")


def _get_path(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _keep_output_recording(model: nn.Module) -> None:
    """transformers looks up what a model records (``output_hidden_states``) by its class name: register the
    patched class under the same entry as the original."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers version: nothing keyed by class
        return
    if hasattr(model, "_can_record_outputs"):
        _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


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
    """Patch a ``transformers`` vision model in place; arguments as :func:`atc.patch.timm_vit.apply_patch`
    (``prop_attn`` is ToMe's name for ``proportional_attn``).

    Args:
        model: one of :data:`SUPPORTED_MODELS` (a tower, or a model holding one: ``CLIPModel``'s vision tower
            is patched, its text tower left as it is).

    Returns:
        the same model, with ``model.r`` (default 0: identical to the unpatched model) and
        ``model._atc_info`` as for timm models.
    """
    check_options(method, linkage, metric, backend)
    proportional_attn = resolve_proportional_attn(proportional_attn, prop_attn)
    if getattr(model, "_atc_patch_module", None) is not None:
        raise ValueError("model is already patched: call atc.patch.remove(model) first")
    tower = _vision_tower(model)
    path, layer_class, prefix_tokens = _TOWERS[type(tower).__name__]
    protected = prefix_tokens(tower.config)
    layers = list(_get_path(tower, path))
    for i, layer in enumerate(layers):
        if type(layer).__name__ != layer_class:
            raise ValueError(f"unsupported layer {type(layer).__name__} at layer {i}; expected {layer_class}")
    config = tower.config
    state = MergeState(method=method, linkage=linkage, proportional_attn=proportional_attn,
                       trace_source=trace_source, backend=backend, metric=metric, layout=layout, protected=protected, depth=len(layers))
    patch_blocks(layers, state, lambda blk: _LAYER_MEMBERS[type(blk).__name__], score_dim=config.hidden_size)
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None:
        if type(head).__name__ not in ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead"):
            raise ValueError(f"unsupported pooling head {type(head).__name__}")
        head._atc_state = state
        swap_class(head, _HEAD_MEMBERS)
    patch_model(model, state, MODULE_NAME)
    _keep_output_recording(model)
    return model


_LAYER_MEMBERS = {name: {"forward": _layer_forward, "_atc_layout": layout} for name, layout in _LAYOUTS.items()}
_HEAD_MEMBERS = {"forward": _siglip_head_forward}
