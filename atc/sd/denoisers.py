"""Diffusion denoisers with random weights, built from named configs offline, and random inputs for them.

    from atc.sd.denoisers import build_denoiser, random_inputs
    model = build_denoiser("pixart-512", depth=4)            # PixArt-α 512px: 32x32 image tokens, width 1152
    out = model(**random_inputs(model, grid=(32, 32), batch=2))

Named configs (:data:`CONFIGS`): the real shapes of Stable Diffusion 1.x's UNet (``sd15``; ``sd15-half`` at half
width), PixArt-α (``pixart-512``, ``pixart-1024``), DiT-XL/2 (``dit-xl-256``), SD3 medium (``sd3-medium``), SD3.5
medium (``sd35-medium``, dual-attention blocks) and Flux dev (``flux-dev``), and tiny versions of each family for
tests (``*-tiny``). ``depth`` keeps only the first transformer blocks of a diffusion transformer, so a CPU can time
a realistic width and token count. Used by the diffusion benchmark (``SD_setup/benchmark_diffusion.py``), the tiny
pipelines (:mod:`atc.sd.tiny_pipeline`) and the tests. Needs diffusers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CONFIGS", "FAMILY_CLASSES", "TEXT_TOKENS", "load_config", "build_denoiser", "random_inputs",
           "token_grid"]

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
PIXART_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2,
                  use_additional_conditions=False)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
_TINY_HEADS = dict(num_attention_heads=2, attention_head_dim=8)

#: name -> (family, config of the diffusers class). Latent sizes: ``sample_size`` (UNet, PixArt, DiT, SD3);
#: Flux packs 2x2 latent pixels into one token, so its token grid is half the latent size.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd15": ("unet", SD15),
    "sd15-half": ("unet", {**SD15, "block_out_channels": (160, 320, 640, 640)}),
    "unet-tiny": ("unet", {**SD15, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
                           "cross_attention_dim": 32, "norm_num_groups": 16}),
    "pixart-512": ("pixart", PIXART_512),
    "pixart-1024": ("pixart", {**PIXART_512, "sample_size": 128, "use_additional_conditions": True}),
    "dit-xl-256": ("dit", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                               num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
    "sd3-medium": ("sd3", SD3_MEDIUM),
    "sd35-medium": ("sd3", {**SD3_MEDIUM, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
                            "pos_embed_max_size": 384}),
    "flux-dev": ("flux", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                              pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "pixart-tiny": ("pixart", dict(**_TINY_HEADS, in_channels=4, out_channels=8, num_layers=3, cross_attention_dim=16,
                                   caption_channels=32, sample_size=32, patch_size=2, norm_num_groups=1)),
    "dit-tiny": ("dit", dict(**_TINY_HEADS, in_channels=4, out_channels=8, num_layers=3, sample_size=16, patch_size=2,
                             num_embeds_ada_norm=10, norm_num_groups=1)),
    "sd3-tiny": ("sd3", dict(**_TINY_HEADS, sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                             joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                             pos_embed_max_size=32)),
    "sd35-tiny": ("sd3", dict(**_TINY_HEADS, sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                              num_layers=3, joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=32, pos_embed_max_size=32, dual_attention_layers=(0, 1),
                              qk_norm="rms_norm")),
    "flux-tiny": ("flux", dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 6, 6))),
}
FAMILY_CLASSES = {"unet": "UNet2DConditionModel", "pixart": "PixArtTransformer2DModel",
                  "dit": "DiTTransformer2DModel", "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
#: Text tokens each family's pipeline feeds its denoiser (CLIP 77; PixArt-α's T5 120; SD3: CLIP 77 + T5 256;
#: Flux dev: T5 512; DiT is class-conditional).
TEXT_TOKENS = {"unet": 77, "pixart": 120, "dit": 0, "sd3": 333, "flux": 512}


def load_config(name: str | Path) -> tuple[str, dict[str, Any]]:
    """``(family, config)`` of a named config (:data:`CONFIGS`) or of a diffusers ``config.json`` (or a model folder
    holding one) of a supported class (:data:`FAMILY_CLASSES`)."""
    if str(name) in CONFIGS:
        family, config = CONFIGS[str(name)]
        return family, dict(config)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{name}: not one of the named configs {sorted(CONFIGS)} and no such config file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({err})") from None
    families = {cls: family for family, cls in FAMILY_CLASSES.items()}
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls not in families:
        raise ValueError(f"{path}: a {cls} config; supported denoisers are {sorted(families)}")
    return families[cls], {k: v for k, v in config.items() if not k.startswith("_")}


def build_denoiser(name: str | Path, depth: int | None = None, seed: int = 0, perturb: float = 0.0,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **overrides: Any) -> nn.Module:
    """The denoiser of config ``name`` (:data:`CONFIGS`, or a ``config.json`` path) with random weights, in eval
    mode.

    ``depth``: keep only this many transformer blocks (diffusion transformers only; Flux keeps its two-stream to
    one-stream proportion, 1:2, with at least one two-stream block). ``perturb``: add Gaussian noise of this
    standard deviation to every parameter (random initialisations leave some gates and output layers at zero,
    under which merging could not change the output). ``overrides`` update the config.
    """
    import diffusers

    family, config = load_config(name)
    config = {**config, **overrides}
    if depth is not None:
        if family == "unet":
            raise ValueError(f"depth applies to diffusion transformers, not to the UNet config {str(name)!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive number of transformer blocks, got {depth!r}")
        if family == "flux":
            double = max(1, round(depth / 3))
            config.update(num_layers=double, num_single_layers=depth - double)
        else:
            config["num_layers"] = depth
    torch.manual_seed(seed)
    model = getattr(diffusers, FAMILY_CLASSES[family])(**config).to(device).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return model


def _family(model: nn.Module) -> str:
    names = {cls.__name__ for cls in type(model).__mro__}
    for family, cls in FAMILY_CLASSES.items():
        if cls in names:
            return family
    raise ValueError(f"random_inputs: unsupported denoiser {type(model).__name__}")


def token_grid(model: nn.Module, latent_h: int, latent_w: int) -> tuple[int, int]:
    """The image-token grid ``(h, w)`` of ``model`` on a ``latent_h × latent_w`` VAE latent (UNet: the latent
    itself, at full resolution; Flux: 2x2 latent pixels per token; PixArt/DiT/SD3: ``patch_size`` patches)."""
    family = _family(model)
    p = 1 if family == "unet" else 2 if family == "flux" else model.config.patch_size
    return math.ceil(latent_h / p), math.ceil(latent_w / p)


def random_inputs(model: nn.Module, grid: tuple[int, int], batch: int = 2, text_tokens: int | None = None,
                  seed: int = 1, timestep: float = 300.0) -> dict[str, Any]:
    """Keyword inputs for one forward of ``model`` on an ``h × w`` image-token grid (UNet: the latent size), on
    the model's device and dtype.

    ``text_tokens``: length of the text embeddings (default: the family's pipeline's, :data:`TEXT_TOKENS`).
    ``timestep`` is on the diffusers scale of the model: 0..1000 (Flux: divided by 1000, as FluxPipeline does).
    """
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    family = _family(model)
    cfg = model.config
    h, w = grid
    text = TEXT_TOKENS[family] if text_tokens is None else text_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    steps = torch.full((batch,), float(timestep), device=device)
    if family == "unet":
        return dict(sample=randn(batch, cfg.in_channels, h, w), timestep=steps[0].to(dtype),
                    encoder_hidden_states=randn(batch, text, cfg.cross_attention_dim))
    if family == "flux":
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        inputs = dict(hidden_states=randn(batch, h * w, cfg.in_channels),
                      encoder_hidden_states=randn(batch, text, cfg.joint_attention_dim),
                      pooled_projections=randn(batch, cfg.pooled_projection_dim), timestep=(steps / 1000).to(dtype),
                      img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device=device))
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return inputs
    p = cfg.patch_size
    latents = randn(batch, cfg.in_channels, h * p, w * p)
    if family == "dit":
        labels = torch.randint(cfg.num_embeds_ada_norm, (batch,), generator=gen).to(device)
        return dict(hidden_states=latents, timestep=steps.long(), class_labels=labels)
    if family == "pixart":
        added = {"resolution": None, "aspect_ratio": None}
        if cfg.use_additional_conditions:
            added = {"resolution": torch.tensor([[h * p * 8.0, w * p * 8.0]] * batch, device=device, dtype=dtype),
                     "aspect_ratio": torch.tensor([[h / w]] * batch, device=device, dtype=dtype)}
        return dict(hidden_states=latents, timestep=steps.long(), encoder_hidden_states=randn(batch, text,
                    cfg.caption_channels), added_cond_kwargs=added)
    return dict(hidden_states=latents, timestep=steps.to(dtype), encoder_hidden_states=randn(batch, text,
                cfg.joint_attention_dim), pooled_projections=randn(batch, cfg.pooled_projection_dim))
