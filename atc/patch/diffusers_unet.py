"""Token merging for diffusers UNets (Stable Diffusion 1.x/2.x, SDXL), following ToMe-SD.

    import atc.patch
    atc.patch.diffusers(pipe, method="atc", ratio=0.5, linkage="average")   # or a bare UNet2DConditionModel
    images = pipe(prompt).images
    atc.patch.remove(pipe)                                                   # exactly the original model again

Every diffusers ``BasicTransformerBlock`` in the UNet is patched. At the start of a block whose latent
downsampling factor is at most ``max_downsample`` (1 = full latent resolution, 4096 tokens for a 512px SD-1.x
image), the block input ``hidden_states (B, N, C)`` is reduced by ``r = int(N * ratio)`` tokens:

- ``method="atc"``: agglomerative clustering of the block input into ``N - r`` clusters (cosine distance,
  ``linkage``), through :func:`atc.merge.merge_by_method`;
- ``method="tome"``: ToMe-SD's bipartite soft matching where the destination set is one token per ``sx × sy``
  cell of the latent grid (chosen at random with ``use_rand``, else the top-left token), through
  :func:`atc.merge.bipartite_soft_matching`.

The same :class:`atc.merge.Merge` is then wrapped around the selected operations of the block: the input of
self-attention (``merge_attn``), the queries of cross-attention (``merge_crossattn``) and the MLP
(``merge_mlp``) are merged (plain mean per slot, as ToMe-SD), the operation runs on ``N - r`` tokens, and its
output is unmerged (every token gets its slot's vector) before the residual addition.

Implementation: forward (pre-)hooks, no copy of diffusers' block code, so the patch follows whatever
``BasicTransformerBlock.forward`` does in the installed diffusers version (norm types, gating, GLIGEN, ...).
``remove_patch`` removes every hook and attribute it added: the model is then exactly the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from atc.cluster import resolve_backend, validate_linkage
from atc.merge import Merge, merge_by_method

__all__ = [
    "apply_patch",
    "remove_patch",
    "reseed",
    "check_options",
    "find_unet",
    "token_grid_downsample",
    "sd_destination_mask",
]

PATCH_MODULE = "diffusers_unet"
METHODS = ("atc", "tome")
_STATE_ATTR = "_atc_sd_state"


@dataclass
class _BlockMerge:
    """The merge computed at the start of one transformer block, used by that block's wrapped operations."""

    merge: Merge | None = None


@dataclass
class _PatchState:
    """Everything the hooks share; lives on the UNet as ``_atc_sd_state``."""

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
    latent_size: tuple[int, int] | None = None
    generator: torch.Generator | None = None
    handles: list[RemovableHandle] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
def token_grid_downsample(num_tokens: int, latent_h: int, latent_w: int, limit: int = 64) -> int | None:
    """Downsampling factor ``d`` (a power of 2) with ``ceil(H/d) * ceil(W/d) == num_tokens``, or ``None``.

    diffusers' downsamplers (stride-2 convs with padding 1) map a side ``s`` to ``ceil(s / 2)``, so the token
    grid of a block at downsampling ``d`` is ``ceil(H/d) × ceil(W/d)``.
    """
    d = 1
    while d <= limit:
        if math.ceil(latent_h / d) * math.ceil(latent_w / d) == num_tokens:
            return d
        d *= 2
    return None


def sd_destination_mask(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """ToMe-SD destination set on an ``h × w`` token grid (raster order): ``(h*w,)`` bool.

    One destination per full ``sy × sx`` cell: a random position in the cell if ``generator`` is given, else
    its top-left token. Tokens outside the full cells (when ``sy ∤ h`` or ``sx ∤ w``) are all sources.
    """
    hsy, wsx = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(hsy, wsx, dtype=torch.long)
    else:
        offset = torch.randint(sx * sy, (hsy, wsx), generator=generator, device=generator.device).cpu()
    rows = torch.arange(hsy).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(wsx).unsqueeze(0) * sx + offset % sx
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows.reshape(-1), cols.reshape(-1)] = True
    return mask.reshape(-1).to(device)


def find_unet(pipe_or_unet: Any) -> nn.Module:
    """The UNet of a diffusers pipeline (``pipe.unet``) or the module itself."""
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, nn.Module):
        return unet
    if isinstance(pipe_or_unet, nn.Module):
        return pipe_or_unet
    raise TypeError(
        f"expected a diffusers pipeline with a `.unet` or a UNet module, got {type(pipe_or_unet).__name__}"
    )


def _transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------
def _first_arg(args: tuple, kwargs: dict, name: str) -> Tensor:
    return args[0] if args else kwargs[name]


def _replace_first_arg(args: tuple, kwargs: dict, name: str, value: Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, name: value}


def _unet_pre_hook(state: _PatchState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = _first_arg(args, kwargs, "sample")
        state.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    return hook


def _compute_merge(state: _PatchState, block: nn.Module, x: Tensor) -> Merge | None:
    """The merge for a block input ``x (B, N, C)``, or ``None`` where this block is not reduced."""
    if state.latent_size is None:
        raise RuntimeError(
            "a patched transformer block ran outside its UNet's forward: call the patched UNet (or pipeline), "
            "not its blocks directly"
        )
    n = x.shape[1]
    lat_h, lat_w = state.latent_size
    down = token_grid_downsample(n, lat_h, lat_w)
    if down is None or down > state.max_downsample:
        return None
    r = int(n * state.ratio)
    if r == 0:
        return None
    if state.merge_mlp and getattr(block, "_chunk_size", None) is not None:
        raise ValueError(
            "merge_mlp cannot be combined with diffusers' feed-forward chunking (it splits the MLP input "
            "into pieces the merge does not know): call unet.disable_forward_chunking() first"
        )
    metric = x.detach()
    if state.method == "atc":
        # ATC in SD clusters the raw block input (as the published SD setup does: the UNet's attention keys are
        # not available before the attention runs); no protected tokens in a UNet.
        return merge_by_method("atc", metric, r, 0, linkage=state.linkage, backend=state.backend)
    h, w = math.ceil(lat_h / down), math.ceil(lat_w / down)
    if h < state.sy or w < state.sx:
        return None  # no full sx×sy cell, so no destination token: ToMe-SD leaves such a block alone
    # ToMe-SD: with an odd batch, conditional and unconditional halves of classifier-free guidance are not in
    # the same batch, and random destinations then cause artefacts, so randomness is switched off.
    use_rand = state.use_rand and x.shape[0] % 2 == 0
    if use_rand and state.generator is None:
        state.generator = torch.Generator().manual_seed(state.seed)
    generator = state.generator if use_rand else None
    dst_mask = sd_destination_mask(h, w, state.sx, state.sy, generator, x.device)
    return merge_by_method("tome", metric, r, 0, dst_mask=dst_mask)


def _block_pre_hook(state: _PatchState, holder: _BlockMerge):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        holder.merge = _compute_merge(state, module, _first_arg(args, kwargs, "hidden_states"))

    return hook


def _block_post_hook(holder: _BlockMerge):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        holder.merge = None  # do not keep the (B, N) labels alive between steps

    return hook


def _op_pre_hook(holder: _BlockMerge, name: str, self_attention: bool):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if holder.merge is None:
            return None
        if self_attention and kwargs.get("encoder_hidden_states") is None and kwargs.get("attention_mask") is not None:
            raise ValueError(
                "a self-attention mask over the latent tokens cannot be used with merge_attn (the merged tokens "
                "no longer match the mask): pass attention_mask=None or patch with merge_attn=False"
            )
        x = _first_arg(args, kwargs, name)
        return _replace_first_arg(args, kwargs, name, holder.merge.merge(x))

    return hook


def _op_post_hook(holder: _BlockMerge):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if holder.merge is None:
            return None
        return holder.merge.unmerge(output)

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
) -> None:
    """Raise a ValueError naming the problem if these :func:`apply_patch` options are invalid (cheap)."""
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


def apply_patch(
    pipe_or_unet: Any,
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
) -> Any:
    """Patch a diffusers pipeline or UNet in place for token merging; returns ``pipe_or_unet``.

    Args:
        pipe_or_unet: a diffusers pipeline with a ``.unet`` (SD 1.x/2.x, SDXL, ...) or a ``UNet2DConditionModel``.
        method: ``"atc"`` (agglomerative clustering) or ``"tome"`` (ToMe-SD bipartite soft matching).
        ratio: fraction of the tokens *removed* (tomesd's name and meaning; ``SD_setup/sd_generate.py`` calls it
            ``--reduction_ratio``), ``r = int(N * ratio)`` per reduced block. Not a keep rate: ``int(N * ratio)``
            is the rounding tomesd and the published runs use, which ``1 - keep_rate`` would not reproduce.
        max_downsample: reduce only blocks whose latent downsampling is ``<= max_downsample`` (1, 2, 4, 8).
            SDXL has no transformer blocks at full resolution: use 2 there.
        merge_attn, merge_crossattn, merge_mlp: which operations run on the merged tokens.
        sx, sy: ToMe-SD cell size (one destination token per ``sy × sx`` cell).
        use_rand: ToMe-SD random destination within each cell (else top-left).
        linkage: ATC linkage, ``"single"``, ``"complete"`` or ``"average"``.
        backend: ATC clustering backend (see :func:`atc.cluster.available_backends`), ``"auto"`` by default.
        seed: seed of the generator behind ToMe-SD's random destinations (see :func:`reseed`).
    """
    unet = find_unet(pipe_or_unet)
    try:
        device = next(unet.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    check_options(method, ratio, max_downsample, sx, sy, linkage, backend, device)
    blocks = _transformer_blocks(unet)
    if not blocks:
        raise ValueError(
            f"{type(unet).__name__} has no diffusers BasicTransformerBlock: the diffusers patch expects a "
            "Stable Diffusion style UNet (UNet2DConditionModel with cross-attention blocks)"
        )
    remove_patch(unet)  # re-patching replaces the previous settings

    state = _PatchState(
        method, float(ratio), max_downsample, bool(merge_attn), bool(merge_crossattn), bool(merge_mlp),
        sx, sy, bool(use_rand), linkage, backend, int(seed),
    )
    state.handles.append(unet.register_forward_pre_hook(_unet_pre_hook(state), with_kwargs=True))
    for block in blocks:
        holder = _BlockMerge()
        state.handles.append(block.register_forward_pre_hook(_block_pre_hook(state, holder), with_kwargs=True))
        state.handles.append(block.register_forward_hook(_block_post_hook(holder)))
        ops = []
        if merge_attn:
            ops.append((block.attn1, "hidden_states", True))
        if merge_crossattn and getattr(block, "attn2", None) is not None:
            ops.append((block.attn2, "hidden_states", False))
        if merge_mlp:
            ops.append((block.ff, "hidden_states", False))
        for module, name, self_attention in ops:
            state.handles.append(
                module.register_forward_pre_hook(_op_pre_hook(holder, name, self_attention), with_kwargs=True)
            )
            state.handles.append(module.register_forward_hook(_op_post_hook(holder)))
    setattr(unet, _STATE_ATTR, state)
    setattr(unet, "_atc_patch_module", PATCH_MODULE)
    return pipe_or_unet


def reseed(pipe_or_unet: Any, seed: int) -> None:
    """Restart the generator of ToMe-SD's random destinations, e.g. once per image for reproducible images."""
    state = getattr(find_unet(pipe_or_unet), _STATE_ATTR, None)
    if state is None:
        raise ValueError("reseed: the model is not patched with atc.patch.diffusers")
    state.seed = int(seed)
    state.generator = None


def remove_patch(pipe_or_unet: Any) -> Any:
    """Remove the patch (every hook and attribute it added); a no-op on an unpatched model."""
    unet = find_unet(pipe_or_unet)
    state = getattr(unet, _STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(unet, _STATE_ATTR)
    if "_atc_patch_module" in vars(unet):
        delattr(unet, "_atc_patch_module")
    return pipe_or_unet
