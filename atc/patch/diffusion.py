"""Token merging for diffusers denoisers, following ToMe-SD: UNets (Stable Diffusion 1.x/2.x, SDXL) and diffusion
transformers (PixArt-α/Σ, DiT, SD3/SD3.5, Flux).

    import atc.patch
    atc.patch.diffusers(pipe, method="atc", ratio=0.5, linkage="average")   # a pipeline, or its bare UNet/transformer
    images = pipe(prompt).images
    atc.patch.remove(pipe)                                                   # exactly the original model again

Supported denoisers (diffusers 0.42) and the blocks that are patched:

============================  =========================================  ===========================================
model                         blocks                                     operations that can run on merged tokens
============================  =========================================  ===========================================
``UNet2DConditionModel``      ``BasicTransformerBlock``                  ``attn1`` (self-attention, ``merge_attn``),
(SD 1.x/2.x, SDXL)                                                       ``attn2`` queries (``merge_crossattn``),
                                                                         ``ff`` (``merge_mlp``)
``PixArtTransformer2DModel``  ``BasicTransformerBlock`` (AdaLN-single)   same as the UNet
``DiTTransformer2DModel``     ``BasicTransformerBlock`` (AdaLN-zero)     ``attn1``, ``ff`` (DiT has no cross-attention)
``SD3Transformer2DModel``     ``JointTransformerBlock`` (MMDiT; SD3.5's  the joint attention ``attn`` and SD3.5's
                              dual-attention blocks and the last         second self-attention ``attn2``
                              ``context_pre_only`` block included)       (``merge_attn``), ``ff`` (``merge_mlp``)
``FluxTransformer2DModel``    ``FluxTransformerBlock`` (two-stream) and  the joint attention ``attn`` (``merge_attn``),
                              ``FluxSingleTransformerBlock`` (one-       ``ff`` / the one-stream block's
                              stream)                                    ``proj_mlp`` (``merge_mlp``)
============================  =========================================  ===========================================

Semantics, the same for every block type. At the start of a patched block the **image tokens** of the block input
``hidden_states (B, N, C)`` are reduced by ``r = int(N * ratio)``:

- ``method="atc"``: agglomerative clustering of the block input into ``N - r`` clusters (cosine distance,
  ``linkage``), through :func:`atc.merge.merge_by_method`;
- ``method="tome"``: ToMe-SD's bipartite soft matching whose destination set is one token per ``sx × sy`` cell of
  the latent token grid (a random position in the cell with ``use_rand``, reproducible with :func:`reseed`; else
  the top-left token), through :func:`atc.merge.bipartite_soft_matching`.

The same :class:`atc.merge.Merge` is wrapped around each selected operation of the block: its image-token input is
merged (plain mean per slot, as ToMe-SD), the operation runs on ``N - r`` image tokens, and its image-token output
is unmerged (every token gets its slot's vector) before the block applies its gates, AdaLN modulation and residual,
exactly as in the unpatched block. **Text tokens are never merged**: SD3's and Flux's text stream
(``encoder_hidden_states``) and the text part of Flux's one-stream blocks pass through untouched, keep their
number, and attend to the merged image tokens.

**Flux's rotary embedding.** ``image_rotary_emb`` holds one ``(cos, sin)`` row per token, text rows first. The row
of a merged image token is the mean of its members' rows (the mean rotation of the tokens it holds, the rule the
timm RoPE ViTs here use with token sizes; within a block every token has size 1); text rows are never touched.
Because a merged table differs per sample while diffusers' ``apply_rotary_emb`` takes one table for the batch, the
patch passes ``image_rotary_emb=None`` to a merged attention and applies the per-sample rotation to the output of
the attention's own q/k RMS norms (``norm_q``, ``norm_k``, and ``norm_added_q``/``norm_added_k`` for the text
stream of two-stream blocks), which ``FluxAttnProcessor`` runs immediately before its rotation: the same formula
on the same values, token by token. Other attention processors (e.g. IP-Adapter's) are refused with a clear error.

Which blocks: ``blocks`` (indices into the denoiser's transformer blocks in execution order; for Flux the
two-stream blocks first, then the one-stream blocks) selects the patched blocks; by default every block of a
diffusion transformer, and every block of a UNet whose latent downsampling is at most ``max_downsample``
(1 = full latent resolution, 4096 tokens for a 512px SD-1.x image). A patch with ``ratio > 0`` that merges
nothing in a forward pass (every block outside ``max_downsample``, or ``int(N * ratio) == 0``) warns once, naming
the reason.

Implementation: torch forward (pre-)hooks on the blocks, their attention/MLP sub-modules and (Flux) the q/k norms;
no copy of diffusers' block code, so the patch follows whatever the installed blocks do (norm types, gating,
GLIGEN, dual attention, ``context_pre_only``). The same mechanism serves every family. It was chosen over diffusers'
own ``diffusers.hooks.HookRegistry`` because torch hooks are removed exactly by their handles, are traced by
``torch.compile`` (no graph break in the merge code; see below), exist on every ``nn.Module`` (UNets and
transformers alike), and run around whatever ``forward`` is installed, so they compose with diffusers' caching
methods, which install their ``HookRegistry`` by replacing ``forward``. No block forward is replaced.
:func:`remove_patch` removes every hook and attribute it added: the model is then exactly the original.

Faster merging (all off by default, which reproduces the published per-block behaviour bit for bit):
``plan="group"`` computes one merge for a group of blocks (UNet: one latent resolution; transformers: all patched
blocks, or runs of ``group_size``) at the group's first block and reuses it in the others; ``reuse_steps=k``
recomputes the plans only every ``k`` denoising steps, telling steps apart by the model's ``timestep``; ``tile``
clusters ATC within tiles of the token grid (:func:`atc.merge.tiled_atc_merge`).

``torch.compile``: a patched model compiles with ``fullgraph=True`` for ATC (clustering is the custom operator
``atc::agglomerative_clustering``; tiles and group plans included) and for ToMe-SD with ``use_rand=False``.
ToMe-SD's random destinations (``use_rand=True``) are drawn from a CPU ``torch.Generator``, which
``torch.compile`` cannot trace (a graph break at each patched block, so compile those with the default
``fullgraph=False``); so is ToMe-SD on Flux, which reads the token grid from ``img_ids`` on the host, and
``reuse_steps > 1``, which reads the timestep on the host.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from atc.cluster import resolve_backend, validate_linkage
from atc.merge import Merge, merge_by_method, tiled_atc_merge

__all__ = [
    "apply_patch",
    "remove_patch",
    "reseed",
    "check_options",
    "find_denoiser",
    "merge_info",
    "token_grid_downsample",
    "normalize_tile",
    "sd_destination_index",
    "sd_destination_mask",
    "METHODS",
    "PLANS",
    "SUPPORTED_MODELS",
]

PATCH_MODULE = "diffusion"
METHODS = ("atc", "tome")
#: ``plan``: every patched block computes its own merge ("block"), or the first block of a group computes it for
#: the group ("group").
PLANS = ("block", "group")
_STATE_ATTR = "_atc_sd_state"

#: Denoiser classes (diffusers 0.42) -> family. UNet-like models are recognised by their blocks and ``sample``.
SUPPORTED_MODELS = {
    "UNet2DConditionModel": "unet",
    "PixArtTransformer2DModel": "pixart",
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
# Position of the `timestep` argument in each family's forward (pipelines pass it by name).
_TIMESTEP_ARG = {"unet": 1, "pixart": 2, "dit": 1, "sd3": 3, "flux": 3}


class _Op(NamedTuple):
    """One operation of a block that can run on merged tokens."""

    attr: str  # sub-module of the block
    option: str  # "attn" | "crossattn" | "mlp": the apply_patch option merge_<option> that selects it
    text_prefix: bool = False  # its input is [text tokens, image tokens] (Flux one-stream block)
    rotary: bool = False  # takes Flux's image_rotary_emb
    self_attention: bool = False  # an attention mask over its tokens would no longer match them


# Block class -> its operations. Rotary norms: (norm module of the attention, which rows of the table it rotates).
_BLOCK_OPS: dict[str, tuple[_Op, ...]] = {
    "BasicTransformerBlock": (
        _Op("attn1", "attn", self_attention=True), _Op("attn2", "crossattn"), _Op("ff", "mlp"),
    ),
    "JointTransformerBlock": (
        _Op("attn", "attn", self_attention=True), _Op("attn2", "attn", self_attention=True), _Op("ff", "mlp"),
    ),
    "FluxTransformerBlock": (_Op("attn", "attn", rotary=True, self_attention=True), _Op("ff", "mlp")),
    "FluxSingleTransformerBlock": (
        _Op("attn", "attn", text_prefix=True, rotary=True, self_attention=True),
        _Op("proj_mlp", "mlp", text_prefix=True),
    ),
}
_ROTARY_NORMS = {
    "FluxTransformerBlock": (("norm_q", "image"), ("norm_k", "image"), ("norm_added_q", "text"),
                             ("norm_added_k", "text")),
    "FluxSingleTransformerBlock": (("norm_q", "joint"), ("norm_k", "joint")),
}


@dataclass
class _BlockState:
    """What one patched block's hooks share during one call of the block."""

    index: int
    kind: str
    merge: Merge | None = None
    text_len: int = 0
    rope: dict[str, tuple[Tensor, Tensor]] | None = None


@dataclass
class _PatchState:
    """Everything the hooks share; lives on the denoiser as ``_atc_sd_state``."""

    family: str
    method: str
    ratio: float
    max_downsample: int
    merge_attn: bool
    merge_crossattn: bool
    merge_mlp: bool
    sx: int
    sy: int
    use_rand: bool
    linkage: str
    backend: str
    seed: int
    blocks: tuple[int, ...]
    plan: str = "block"
    group_size: int | None = None
    reuse_steps: int = 1
    tile: tuple[int, int] | None = None
    patch_size: int = 1
    latent_size: tuple[int, int] | None = None  # UNet: the latent (H, W) of the current forward
    grid: tuple[int, int] | None = None  # transformers: the image token grid (h, w) of the current forward
    img_ids: Tensor | None = None  # Flux: the token positions, read only where the grid is needed
    generator: torch.Generator | None = None
    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)  # block -> (N, N - r) in the last forward
    plans: int = 0  # merges (clusterings / matchings) computed since the patch
    cache: dict[tuple, tuple[tuple[int, int], Merge | None]] = field(default_factory=dict)  # plan key -> (B, N), merge
    seen: dict[int, int] = field(default_factory=dict)  # this forward: token count -> patched blocks run so far
    last_timestep: float | None = None  # reuse_steps > 1: the timestep and input shape of the last forward
    last_shape: tuple[int, ...] | None = None
    step: int = 0  # denoising steps since the trajectory began
    skipped: dict[str, None] = field(default_factory=dict)  # why blocks merged nothing in the current forward
    warned: bool = False
    handles: list[RemovableHandle] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
def token_grid_downsample(num_tokens: int, latent_h: int, latent_w: int, limit: int = 64) -> int | None:
    """Downsampling factor ``d`` (a power of 2) with ``ceil(H/d) * ceil(W/d) == num_tokens``, or ``None``.

    diffusers' UNet downsamplers (stride-2 convs with padding 1) map a side ``s`` to ``ceil(s / 2)``, so the token
    grid of a UNet block at downsampling ``d`` is ``ceil(H/d) × ceil(W/d)``.
    """
    d = 1
    while d <= limit:
        if math.ceil(latent_h / d) * math.ceil(latent_w / d) == num_tokens:
            return d
        d *= 2
    return None


def sd_destination_index(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None) -> list[int]:
    """ToMe-SD's destination tokens on an ``h × w`` token grid (raster order), as Python ints.

    One destination per full ``sy × sx`` cell: a random position in the cell drawn from ``generator`` (one draw
    of shape ``(h // sy, w // sx)``, as ToMe-SD), else the cell's top-left token. Tokens outside the full cells
    (when ``sy ∤ h`` or ``sx ∤ w``) are all sources.
    """
    hsy, wsx = h // sy, w // sx
    if generator is None:
        offsets = [0] * (hsy * wsx)
    else:
        offsets = torch.randint(sx * sy, (hsy, wsx), generator=generator, device=generator.device).flatten().tolist()
    return [(i * sy + o // sx) * w + j * sx + o % sx for (i, j), o in zip(product(range(hsy), range(wsx)), offsets)]


def sd_destination_mask(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """:func:`sd_destination_index` as a ``(h*w,)`` bool mask."""
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[sd_destination_index(h, w, sx, sy, generator)] = True
    return mask.to(device)


def find_denoiser(pipe_or_model: Any) -> nn.Module:
    """The denoiser of a diffusers pipeline (``pipe.unet`` or ``pipe.transformer``) or the module itself."""
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_model, name, None)
        if isinstance(model, nn.Module):
            return model
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    raise TypeError(
        f"expected a diffusers pipeline (with a `.unet` or `.transformer`) or a denoiser module, got "
        f"{type(pipe_or_model).__name__}"
    )


def _family(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_MODELS:
            return SUPPORTED_MODELS[cls.__name__]
    from diffusers.models.attention import BasicTransformerBlock

    if any(isinstance(m, BasicTransformerBlock) for m in model.modules()) and "sample" in _forward_params(model):
        return "unet"  # another UNet with ToMe-SD's blocks (e.g. a fine-tuned subclass or a custom UNet)
    raise ValueError(
        f"{type(model).__name__} is not a denoiser the diffusers patch supports: expected one of "
        f"{sorted(SUPPORTED_MODELS)} (or a pipeline holding one as `.unet` / `.transformer`), or a UNet with "
        "diffusers BasicTransformerBlock layers"
    )


def _forward_params(model: nn.Module) -> list[str]:
    import inspect

    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def _transformer_blocks(model: nn.Module, family: str) -> list[nn.Module]:
    """The denoiser's transformer blocks in execution order (the indices of the ``blocks`` option)."""
    if family == "unet":
        from diffusers.models.attention import BasicTransformerBlock

        return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    blocks = list(model.transformer_blocks)
    if family == "flux":
        blocks += list(model.single_transformer_blocks)
    return blocks


def _select_blocks(blocks: Iterable[int] | None, num_blocks: int) -> tuple[int, ...]:
    if blocks is None:
        return tuple(range(num_blocks))
    if isinstance(blocks, (int, str)) or not isinstance(blocks, Iterable):
        raise TypeError(f"blocks must be a sequence of block indices (e.g. range(2, {num_blocks})), got {blocks!r}")
    chosen = []
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"blocks must hold integer block indices, got {i!r}")
        if not -num_blocks <= i < num_blocks:
            raise ValueError(f"blocks: index {i} is out of range for a model with {num_blocks} transformer blocks "
                             f"(valid: 0..{num_blocks - 1}, or negative from the end)")
        chosen.append(i % num_blocks)
    if not chosen:
        raise ValueError("blocks selects no transformer block, so nothing would be merged: give at least one "
                         f"index in 0..{num_blocks - 1}, or blocks=None for the default")
    return tuple(sorted(set(chosen)))


# --------------------------------------------------------------------------------------------------------------
# Argument plumbing
# --------------------------------------------------------------------------------------------------------------
def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _replace_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, name: value}


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` (interleaved pairs, Flux's convention) for
    tables that broadcast against ``x (B, S, H, D)``, i.e. one table per sample: ``cos, sin (B|1, S, 1, D)``."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _merge_rotary(m: Merge, rope: tuple[Tensor, Tensor], joint: bool, device: torch.device) -> dict:
    """Flux's ``(cos, sin)`` tables ``(S_text + N, D)`` for the merged tokens, shaped for :func:`_apply_rotary`."""
    cos, sin = (t.to(device) for t in rope)
    bsz, n = m.labels.shape
    text = cos.shape[0] - n

    def image(table: Tensor) -> Tensor:  # mean of each slot's rows, one table per sample
        return m.merge(table[text:].unsqueeze(0).expand(bsz, -1, -1))

    cos_img, sin_img = image(cos), image(sin)
    if joint:
        cos_all = torch.cat([cos[:text].unsqueeze(0).expand(bsz, -1, -1), cos_img], dim=1)
        sin_all = torch.cat([sin[:text].unsqueeze(0).expand(bsz, -1, -1), sin_img], dim=1)
        return {"joint": (cos_all.unsqueeze(2), sin_all.unsqueeze(2))}
    return {"image": (cos_img.unsqueeze(2), sin_img.unsqueeze(2)),
            "text": (cos[None, :text, None, :], sin[None, :text, None, :])}


# --------------------------------------------------------------------------------------------------------------
# The merge of one block
# --------------------------------------------------------------------------------------------------------------
def _skip(state: _PatchState, reason: str) -> None:
    state.skipped[reason] = None
    return None


def _flux_grid(img_ids: Tensor, n: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of Flux's image tokens from ``img_ids (N, 3)`` (host read), checked to be row-major."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    rows, cols = ids[:, 1].round().long().cpu(), ids[:, 2].round().long().cpu()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != n or not torch.equal(rows * w + cols, torch.arange(n)):
        raise ValueError(
            "ToMe-SD on Flux needs the image tokens on a row-major grid, as FluxPipeline lays them out (img_ids "
            f"[0, row, col] in raster order); these {n} img_ids are not. Use method='atc', which needs no grid"
        )
    return h, w


def _block_grid(state: _PatchState, n: int) -> tuple[int, int] | str:
    """The ``(h, w)`` token grid of a block with ``n`` image tokens, or the reason it is not merged."""
    if state.family == "unet":
        if state.latent_size is None:
            raise RuntimeError(
                "a patched transformer block ran outside its UNet's forward: call the patched UNet (or pipeline), "
                "not its blocks directly"
            )
        lat_h, lat_w = state.latent_size
        down = token_grid_downsample(n, lat_h, lat_w)
        if down is None:
            return f"{n} tokens match no downsampling of the {lat_h}x{lat_w} latent"
        if down > state.max_downsample:
            return (f"blocks at latent downsampling {down} are outside max_downsample={state.max_downsample} "
                    "(SDXL has no transformer blocks at full resolution: use max_downsample=2 there)")
        return math.ceil(lat_h / down), math.ceil(lat_w / down)
    if state.grid is None:
        if state.img_ids is None:
            raise RuntimeError("a patched transformer block ran outside its model's forward: call the patched "
                               "model (or pipeline), not its blocks directly")
        state.grid = _flux_grid(state.img_ids, n)
    return state.grid


def _compute_merge(state: _PatchState, block: nn.Module, x: Tensor) -> Merge | None:
    """The merge for a block's image tokens ``x (B, N, C)``, or ``None`` where this block is not reduced."""
    n = x.shape[1]
    need_grid = state.family == "unet" or state.method == "tome" or state.tile is not None
    grid = _block_grid(state, n) if need_grid else None
    if isinstance(grid, str):
        return _skip(state, grid)
    r = int(n * state.ratio)
    if r == 0:
        return _skip(state, f"r = int({n} tokens * ratio {state.ratio:g}) = 0")
    if state.merge_mlp and getattr(block, "_chunk_size", None) is not None:
        raise ValueError(
            "merge_mlp cannot be combined with diffusers' feed-forward chunking (it splits the MLP input "
            "into pieces the merge does not know): call model.disable_forward_chunking() first"
        )
    metric = x.detach()
    if state.method == "atc":
        # ATC in diffusion clusters the raw block input (as the published SD setup does: the attention keys are
        # not available before the attention runs); no protected tokens among image tokens.
        if state.tile is not None:
            return tiled_atc_merge(metric, r, grid, state.tile, linkage=state.linkage, backend=state.backend)
        return merge_by_method("atc", metric, r, 0, linkage=state.linkage, backend=state.backend)
    h, w = grid
    if h * w != n:
        raise RuntimeError(f"internal: a {h}x{w} token grid does not hold the block's {n} tokens")
    if h < state.sy or w < state.sx:
        return _skip(state, f"a {h}x{w} token grid holds no full {state.sx}x{state.sy} ToMe-SD cell")
    # ToMe-SD: with an odd batch, conditional and unconditional halves of classifier-free guidance are not in
    # the same batch, and random destinations then cause artefacts, so randomness is switched off.
    use_rand = state.use_rand and x.shape[0] % 2 == 0
    if use_rand and state.generator is None:
        state.generator = torch.Generator().manual_seed(state.seed)
    dst = sd_destination_index(h, w, state.sx, state.sy, state.generator if use_rand else None)
    return merge_by_method("tome", metric, r, 0, dst_index=dst)


def _plan_for(state: _PatchState, bs: _BlockState, block: nn.Module, x: Tensor) -> Merge | None:
    """The merge of a patched block: computed here, or reused from the block's group (``plan="group"``) or from an
    earlier step (``reuse_steps > 1``). Returns ``None`` where the block is not reduced."""
    bsz, n = int(x.shape[0]), int(x.shape[1])
    if state.plan == "group":
        k = state.seen.get(n, 0)
        state.seen[n] = k + 1
        key: tuple = ("group", n, k // state.group_size if state.group_size else 0)
    else:
        key = ("block", bs.index)
    cached = state.cache.get(key)
    if cached is not None and cached[0] == (bsz, n):
        return cached[1]
    m = _compute_merge(state, block, x)
    if m is not None and not torch.compiler.is_compiling():  # a counter read under compile would recompile
        state.plans += 1
    if state.plan == "group" or state.reuse_steps > 1:
        state.cache[key] = ((bsz, n), m)
    return m


def _advance_step(state: _PatchState, timestep: Any, shape: tuple[int, ...]) -> None:
    """Track denoising steps from the timestep the model is called with (``reuse_steps > 1``).

    A call with the same timestep as the last one is the same step (e.g. the second call of a pipeline that runs
    the conditional and unconditional batches separately); another timestep is the next step; a larger timestep
    (timesteps fall along a trajectory) or another input shape begins a new trajectory. Plans are recomputed at
    the first step of a trajectory and every ``reuse_steps`` steps after it."""
    if timestep is None:
        raise ValueError("reuse_steps > 1 tells denoising steps apart by the timestep the model is called with, "
                         "but this call has none")
    value = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep)
    if state.last_timestep is None or value > state.last_timestep or shape != state.last_shape:
        state.step = 0
        state.cache.clear()
    elif value != state.last_timestep:
        state.step += 1
        if state.step % state.reuse_steps == 0:
            state.cache.clear()
    state.last_timestep, state.last_shape = value, shape


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------
def _model_pre_hook(state: _PatchState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.skipped.clear()
        state.tokens.clear()
        state.seen.clear()
        state.grid = None
        x = _arg(args, kwargs, 0, "sample" if state.family == "unet" else "hidden_states")
        if state.reuse_steps > 1:
            _advance_step(state, _arg(args, kwargs, _TIMESTEP_ARG[state.family], "timestep"), tuple(x.shape))
        if state.family == "unet":
            state.latent_size = (int(x.shape[-2]), int(x.shape[-1]))
        elif state.family == "flux":
            state.img_ids = _arg(args, kwargs, 4, "img_ids")
        else:  # PixArt, DiT, SD3: (B, C, H, W) latents cut into patch_size × patch_size patches
            state.grid = (int(x.shape[-2]) // state.patch_size, int(x.shape[-1]) // state.patch_size)

    return hook


def _model_post_hook(state: _PatchState):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        state.img_ids = None
        if state.reuse_steps == 1:
            state.cache.clear()  # a group's plan lives for one forward pass
        if state.ratio > 0 and not state.tokens and not state.warned:
            state.warned = True
            reasons = "; ".join(state.skipped) or "no patched block ran"
            warnings.warn(
                f"atc.patch.diffusers(ratio={state.ratio:g}) merged no tokens in this forward pass of "
                f"{type(module).__name__}: {reasons}. The output equals the unpatched model's",
                stacklevel=2,
            )

    return hook


def _block_pre_hook(state: _PatchState, bs: _BlockState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _arg(args, kwargs, 0, "hidden_states")
        bs.merge = _plan_for(state, bs, module, x)
        if bs.merge is not None:
            state.tokens[bs.index] = (int(x.shape[1]), bs.merge.num_out)
            if bs.kind == "FluxSingleTransformerBlock":  # its ops see [text, image]: remember where images start
                bs.text_len = int(_arg(args, kwargs, 1, "encoder_hidden_states").shape[1])

    return hook


def _block_post_hook(bs: _BlockState):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        bs.merge = None  # do not keep the (B, N) labels alive between steps
        bs.rope = None

    return hook


def _op_pre_hook(bs: _BlockState, op: _Op):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = bs.merge
        if m is None:
            return None
        if op.self_attention and _arg(args, kwargs, 2, "attention_mask") is not None and (
            op.attr != "attn1" or kwargs.get("encoder_hidden_states") is None
        ):
            raise ValueError(
                "an attention mask over the image tokens cannot be used with merge_attn (the merged tokens no "
                "longer match the mask): pass no attention mask or patch with merge_attn=False"
            )
        x = _arg(args, kwargs, 0, "hidden_states")
        if op.text_prefix:
            t = bs.text_len
            merged = torch.cat([x[:, :t], m.merge(x[:, t:])], dim=1)
        else:
            merged = m.merge(x)
        args, kwargs = _replace_arg(args, kwargs, 0, "hidden_states", merged)
        if op.rotary:
            rope = _arg(args, kwargs, 3, "image_rotary_emb")
            if rope is not None:
                from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

                if type(module.processor) is not FluxAttnProcessor:
                    raise ValueError(
                        f"merging Flux's attention needs its default FluxAttnProcessor (the patch rotates the "
                        f"merged tokens in the q/k norms), not {type(module.processor).__name__}: restore it with "
                        "attn.set_processor(FluxAttnProcessor()) or patch with merge_attn=False"
                    )
                bs.rope = _merge_rotary(m, rope, op.text_prefix, x.device)
                args, kwargs = _replace_arg(args, kwargs, 3, "image_rotary_emb", None)
        return args, kwargs

    return hook


def _op_post_hook(bs: _BlockState, op: _Op):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        m = bs.merge
        if m is None:
            return None
        bs.rope = None
        first = output[0] if isinstance(output, tuple) else output
        if op.text_prefix:
            t = bs.text_len
            first = torch.cat([first[:, :t], m.unmerge(first[:, t:])], dim=1)
        else:
            first = m.unmerge(first)
        return (first, *output[1:]) if isinstance(output, tuple) else first

    return hook


def _rotary_norm_hook(bs: _BlockState, part: str):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if bs.rope is None:
            return None
        cos, sin = bs.rope[part]
        return _apply_rotary(output, cos, sin)

    return hook


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def check_options(
    method: str = "atc",
    ratio: float = 0.5,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    linkage: str = "average",
    backend: str = "auto",
    device: torch.device | str = "cpu",
    plan: str = "block",
    group_size: int | None = None,
    reuse_steps: int = 1,
    tile: int | tuple[int, int] | None = None,
) -> None:
    """Raise a ValueError naming the problem if these :func:`apply_patch` options are invalid (cheap, no model)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for the diffusers patch: choose one of {list(METHODS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise TypeError(f"ratio (fraction of tokens removed) must be a number in [0, 1), got {ratio!r}")
    for name, value in (("max_downsample", max_downsample), ("sx", sx), ("sy", sy)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if method == "atc" and not 0 <= ratio < 1:
        raise ValueError(f"ratio is the fraction of tokens removed and must be in [0, 1), got {ratio}")
    limit = 1 - 1 / (sx * sy)
    if method == "tome" and not 0 <= ratio <= limit:
        raise ValueError(
            f"ToMe-SD keeps one destination token per {sx}x{sy} cell, so it can remove at most "
            f"1 - 1/(sx*sy) = {limit:g} of the tokens; got ratio={ratio} (use a smaller ratio or method='atc')"
        )
    validate_linkage(linkage)
    if method == "atc":
        resolve_backend(backend, device)
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}: choose one of {list(PLANS)}")
    for name, value in (("group_size", group_size), ("reuse_steps", reuse_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if reuse_steps is None:
        raise ValueError("reuse_steps must be a positive integer (1: a new plan at every step), got None")
    if group_size is not None and plan != "group":
        raise ValueError(f"group_size={group_size} applies to plan='group' (blocks sharing one merge plan); "
                         "with plan='block' every block plans for itself")
    if tile is not None:
        normalize_tile(tile)
        if method != "atc":
            raise ValueError("tile cuts ATC's clustering into tiles of the token grid; ToMe-SD is already local (one "
                             "destination per sx x sy cell): use sx, sy for ToMe, or method='atc'")


def normalize_tile(tile: int | Iterable[int] | None) -> tuple[int, int] | None:
    """``tile`` as ``(height, width)`` in latent tokens (an int is a square tile), checked; ``None`` stays."""
    if tile is None:
        return None
    values = [tile] if isinstance(tile, int) and not isinstance(tile, bool) else list(tile) \
        if isinstance(tile, Iterable) and not isinstance(tile, (str, bytes)) else None
    if (values is None or len(values) not in (1, 2)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)):
        raise ValueError(f"tile must be a positive int or (height, width) in latent tokens, e.g. (16, 16); got {tile!r}")
    return (values[0], values[-1])


def apply_patch(
    pipe_or_model: Any,
    method: str = "atc",
    ratio: float = 0.5,
    max_downsample: int = 1,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    linkage: str = "average",
    backend: str = "auto",
    seed: int = 0,
    blocks: Iterable[int] | None = None,
    plan: str = "block",
    group_size: int | None = None,
    reuse_steps: int = 1,
    tile: int | tuple[int, int] | None = None,
) -> Any:
    """Patch a diffusers pipeline or denoiser in place for token merging; returns ``pipe_or_model``.

    Args:
        pipe_or_model: a diffusers pipeline with a ``.unet`` (SD 1.x/2.x, SDXL) or ``.transformer`` (PixArt-α/Σ,
            DiT, SD3/SD3.5, Flux), or the bare denoiser (see :data:`SUPPORTED_MODELS`).
        method: ``"atc"`` (agglomerative clustering) or ``"tome"`` (ToMe-SD bipartite soft matching).
        ratio: fraction of the image tokens *removed* (tomesd's name and meaning; ``SD_setup/sd_generate.py``
            calls it ``--reduction_ratio``), ``r = int(N * ratio)`` per patched block. Not a keep rate:
            ``int(N * ratio)`` is the rounding tomesd and the published runs use.
        max_downsample: UNets only: reduce only blocks whose latent downsampling is ``<= max_downsample``
            (1, 2, 4, 8). SDXL has no transformer blocks at full resolution: use 2 there.
        merge_attn: merge the tokens of self-attention (SD3/Flux: the joint attention, whose text tokens stay
            as they are; SD3.5 also its second self-attention). On by default for every family.
        merge_crossattn: merge the cross-attention queries (UNets, PixArt). SD3, Flux and DiT have no
            cross-attention: an error there. Off by default (ToMe-SD).
        merge_mlp: merge the tokens of the MLP (Flux's one-stream block: ``proj_mlp``). Off by default (ToMe-SD
            found it costs the most quality); on diffusion transformers the MLP is the larger share of a
            block's cost, so it buys the most speed there.
        sx, sy: ToMe-SD cell size (one destination token per ``sy × sx`` cell of the latent token grid).
        use_rand: ToMe-SD random destination within each cell (else top-left).
        linkage: ATC linkage, ``"single"``, ``"complete"`` or ``"average"``.
        backend: ATC clustering backend (see :func:`atc.cluster.available_backends`), ``"auto"`` by default.
        seed: seed of the generator behind ToMe-SD's random destinations (see :func:`reseed`).
        blocks: indices of the transformer blocks to patch, in execution order (Flux: the two-stream blocks, then
            the one-stream blocks; negative indices count from the end), e.g. ``range(2, 28)`` to leave the first
            two blocks of a 28-block PixArt unmerged. ``None`` (default): every block (UNets: every block within
            ``max_downsample``).
        plan: ``"block"`` (default): every patched block computes its merge from its own input. ``"group"``: the
            first patched block of a group computes it and the others of the group reuse it (labels / matches);
            a group is the patched blocks that see the same token count in one forward pass (UNet: one latent
            resolution, down and up path; diffusion transformers: all patched blocks), cut into runs of
            ``group_size`` blocks in execution order if given.
        group_size: with ``plan="group"``: blocks per group (default: all blocks at one token count).
        reuse_steps: compute the plans at the first denoising step and every ``reuse_steps`` steps after it, and
            reuse them in between (default 1: every step). Steps are told apart by the ``timestep`` the model is
            called with (see :func:`_advance_step`); a new image (a larger timestep) or another batch shape
            recomputes. Works with classifier-free guidance batches and ``num_images_per_prompt``.
        tile: ATC only: ``(height, width)`` (or an int for a square) in latent tokens; the token grid is cut into
            tiles clustered on their own, ``r`` split over them in proportion to their size
            (:func:`atc.merge.tiled_atc_merge`). ``None`` (default): the whole grid.
    """
    model = find_denoiser(pipe_or_model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    check_options(method, ratio, max_downsample, sx, sy, linkage, backend, device, plan, group_size, reuse_steps,
                  tile)
    family = _family(model)
    all_blocks = _transformer_blocks(model, family)
    if not all_blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to patch")
    selected = _select_blocks(blocks, len(all_blocks))
    options = {"attn": bool(merge_attn), "crossattn": bool(merge_crossattn), "mlp": bool(merge_mlp)}
    if merge_crossattn and not any(getattr(all_blocks[i], "attn2", None) is not None
                                   and type(all_blocks[i]).__name__ == "BasicTransformerBlock" for i in selected):
        raise ValueError(
            f"merge_crossattn: {type(model).__name__} has no cross-attention in the selected blocks (SD3 and Flux "
            "attend to text and image tokens jointly, which merge_attn covers; DiT has no text): patch with "
            "merge_crossattn=False"
        )
    remove_patch(model)  # re-patching replaces the previous settings

    state = _PatchState(
        family, method, float(ratio), max_downsample, options["attn"], options["crossattn"], options["mlp"],
        sx, sy, bool(use_rand), linkage, backend, int(seed), selected, plan, group_size, int(reuse_steps),
        normalize_tile(tile), patch_size=int(getattr(getattr(model, "config", None), "patch_size", None) or 1),
    )
    state.handles.append(model.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(_model_post_hook(state)))
    for index in selected:
        block = all_blocks[index]
        kind = type(block).__name__
        if kind not in _BLOCK_OPS:
            kind = next(c.__name__ for c in type(block).__mro__ if c.__name__ in _BLOCK_OPS)
        bs = _BlockState(index, kind)
        state.handles.append(block.register_forward_pre_hook(_block_pre_hook(state, bs), with_kwargs=True))
        state.handles.append(block.register_forward_hook(_block_post_hook(bs)))
        for op in _BLOCK_OPS[kind]:
            module = getattr(block, op.attr, None)
            if module is None or not options[op.option]:
                continue
            state.handles.append(module.register_forward_pre_hook(_op_pre_hook(bs, op), with_kwargs=True))
            state.handles.append(module.register_forward_hook(_op_post_hook(bs, op)))
            if op.rotary:
                for norm, part in _ROTARY_NORMS[kind]:
                    norm_module = getattr(module, norm, None)
                    if norm_module is not None:
                        state.handles.append(norm_module.register_forward_hook(_rotary_norm_hook(bs, part)))
    setattr(model, _STATE_ATTR, state)
    setattr(model, "_atc_patch_module", PATCH_MODULE)
    return pipe_or_model


def reseed(pipe_or_model: Any, seed: int) -> None:
    """Restart the generator of ToMe-SD's random destinations and forget the plans kept for reuse
    (``reuse_steps``), e.g. once per image for reproducible images."""
    state = getattr(find_denoiser(pipe_or_model), _STATE_ATTR, None)
    if state is None:
        raise ValueError("reseed: the model is not patched with atc.patch.diffusers")
    state.seed = int(seed)
    state.generator = None
    state.cache.clear()
    state.last_timestep = state.last_shape = None
    state.step = 0


def merge_info(pipe_or_model: Any) -> dict[str, Any]:
    """What the patch did: ``{"tokens": {block index: (N, N - r)} for every block that merged in the last forward
    pass, "plans": merges (clusterings or matchings) computed since the patch}`` (``plans`` counts eager forward
    passes only: a compiled model does not update it)."""
    state = getattr(find_denoiser(pipe_or_model), _STATE_ATTR, None)
    if state is None:
        raise ValueError("merge_info: the model is not patched with atc.patch.diffusers")
    return {"tokens": dict(state.tokens), "plans": state.plans}


def remove_patch(pipe_or_model: Any) -> Any:
    """Remove the patch (every hook and attribute it added); a no-op on an unpatched model."""
    model = find_denoiser(pipe_or_model)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(model, _STATE_ATTR)
    if "_atc_patch_module" in vars(model):
        delattr(model, "_atc_patch_module")
    return pipe_or_model
