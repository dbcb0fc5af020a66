"""A tiny randomly initialised Stable Diffusion pipeline, built offline (for smoke runs and tests).

    from atc.sd.tiny_pipeline import build_tiny_pipeline
    build_tiny_pipeline().save_pretrained("/tmp/tiny-sd")            # SD-1.x shaped
    build_tiny_pipeline(sdxl=True).save_pretrained("/tmp/tiny-sdxl")  # SDXL shaped (two text encoders)

or from the shell: ``python SD_setup/tiny_pipeline.py --output /tmp/tiny-sd [--sdxl]``.

The result is a normal diffusers pipeline that ``SD_setup/sd_generate.py --model`` loads exactly like a real
Stable Diffusion checkpoint: same classes, same files, just a few thousand random parameters. The tokenizer's
vocabulary (bytes, plus every byte with the end-of-word marker) is generated here, so nothing is downloaded.
Images from it are noise: it exists to exercise the code, not to make pictures. Needs diffusers and
transformers (``requirements/sd.txt``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["tiny_unet_config", "build_tiny_tokenizer", "build_tiny_pipeline"]


def tiny_unet_config(sdxl: bool = False, cross_attention_dim: int = 32) -> dict:
    """A ``UNet2DConditionModel`` config with SD's layout at a tiny width.

    SD-1.x layout: transformer blocks at full latent resolution (down 0, up 1) and at 1/2 (down 1, mid, up 0).
    SDXL layout: no transformer at full resolution (a plain first down block), ``text_time`` added conditioning.
    """
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        config.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * cross_attention_dim,  # the two text encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=cross_attention_dim + 6 * 8,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
        )
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the base alphabet of CLIP's BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def build_tiny_tokenizer(folder: str | Path, model_max_length: int = 77):
    """A CLIP tokenizer over a generated vocabulary (every byte, with and without ``</w>``), saved in ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=model_max_length
    )


def _text_encoder(vocab_size: int, hidden: int, projection: bool, max_positions: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_positions, projection_dim=hidden,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build_tiny_pipeline(sdxl: bool = False, seed: int = 0):
    """A ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) with tiny random weights, on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    hidden = 32
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    vocab_size = len(tokenizer)
    unet = UNet2DConditionModel(**tiny_unet_config(sdxl, hidden)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,  # as SD 1.x ships it (0 triggers a diffusers deprecation warning)
    )
    positions = tokenizer.model_max_length
    if not sdxl:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae, text_encoder=_text_encoder(vocab_size, hidden, False, positions), tokenizer=tokenizer,
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=_text_encoder(vocab_size, hidden, False, positions),
        text_encoder_2=_text_encoder(vocab_size, hidden, True, positions), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )

