"""Tiny randomly initialised diffusion pipelines and denoisers, built offline (for smoke runs, demos and tests).

    from atc.sd.tiny_pipeline import build_tiny_pipeline
    build_tiny_pipeline().save_pretrained("/tmp/tiny-sd")            # SD-1.x shaped
    build_tiny_pipeline("sdxl").save_pretrained("/tmp/tiny-sdxl")    # SDXL shaped (two text encoders)
    build_tiny_pipeline("pixart")   # PixArt-α (T5 text encoder, PixArtTransformer2DModel)
    build_tiny_pipeline("sd3")      # Stable Diffusion 3 (two CLIP text encoders, MMDiT; "sd35": dual attention)
    build_tiny_pipeline("flux")     # Flux (CLIP + T5 text encoders, two- and one-stream blocks)
    model = build_denoiser("flux-tiny"); inputs = random_inputs(model, grid=(4, 6))   # from atc.sd.denoisers

or from the shell: ``python SD_setup/tiny_pipeline.py --output /tmp/tiny-sd [--kind sdxl|pixart|sd3|sd35|flux]``.

The result is a normal diffusers pipeline that ``SD_setup/sd_generate.py --model`` loads exactly like a real
checkpoint: same classes, same files, just a few thousand random parameters. The tokenizers' vocabularies (CLIP's
bytes with and without the end-of-word marker; T5's characters) are generated here, so nothing is downloaded.
Images from it are noise: it exists to exercise the code, not to make pictures. Needs diffusers and
transformers (``requirements/sd.txt``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from atc.sd.denoisers import build_denoiser

__all__ = [
    "PIPELINE_KINDS",
    "TRANSFORMER_FAMILIES",
    "tiny_unet_config",
    "build_tiny_tokenizer",
    "build_tiny_t5_tokenizer",
    "build_tiny_pipeline",
]

#: Tiny diffusion transformers (``atc.sd.denoisers.CONFIGS[f"{family}-tiny"]``; "sd35": SD3 with SD3.5's
#: dual-attention blocks).
TRANSFORMER_FAMILIES = ("pixart", "dit", "sd3", "sd35", "flux")
#: Pipelines :func:`build_tiny_pipeline` builds.
PIPELINE_KINDS = ("sd15", "sdxl", "pixart", "sd3", "sd35", "flux")


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


def build_tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram) over a generated vocabulary: the printable characters, with and without T5's
    word-start marker."""
    import string

    from transformers import T5Tokenizer

    chars = ["\u2581", *string.printable.strip(), *("\u2581" + c for c in string.ascii_letters + string.digits)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -0.01 * (i + 1)) for i, c in enumerate(chars)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5_encoder(vocab_size: int, hidden: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def _tiny_vae(latent_channels: int, levels: int, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    extra = {} if shift_factor is None else dict(shift_factor=shift_factor, use_quant_conv=False,
                                                 use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=4, sample_size=32, **extra,
    ).eval()


def build_tiny_pipeline(kind: str = "sd15", seed: int = 0):
    """A diffusers pipeline of ``kind`` (:data:`PIPELINE_KINDS`) with tiny random weights, on CPU.

    ``sd15``: ``StableDiffusionPipeline`` (64px images by default, 32×32 latents); ``sdxl``:
    ``StableDiffusionXLPipeline``; ``pixart``: ``PixArtAlphaPipeline`` (256px by its resolution binning, 16×16 image
    tokens); ``sd3``/``sd35``: ``StableDiffusion3Pipeline`` without the T5 encoder (32px, 8×8 image tokens);
    ``flux``: ``FluxPipeline`` (pass ``height``/``width``, e.g. 32 for 8×8 image tokens; its default is 256px).
    """
    if isinstance(kind, bool):  # the former signature build_tiny_pipeline(sdxl: bool)
        kind = "sdxl" if kind else "sd15"
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: choose one of {PIPELINE_KINDS}")
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    hidden = 32
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    vocab_size = len(tokenizer)
    positions = tokenizer.model_max_length
    ddim = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)  # as SD 1.x ships it (0 triggers a deprecation warning)
    if kind in ("sd15", "sdxl"):
        sdxl = kind == "sdxl"
        unet = UNet2DConditionModel(**tiny_unet_config(sdxl, hidden)).eval()
        vae = _tiny_vae(4, 2)
        if not sdxl:
            from diffusers import StableDiffusionPipeline

            return StableDiffusionPipeline(
                vae=vae, text_encoder=_text_encoder(vocab_size, hidden, False, positions), tokenizer=tokenizer,
                unet=unet, scheduler=DDIMScheduler(**ddim), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=_text_encoder(vocab_size, hidden, False, positions),
            text_encoder_2=_text_encoder(vocab_size, hidden, True, positions), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**ddim),
        )
    if kind == "pixart":
        from diffusers import PixArtAlphaPipeline

        t5_tokenizer = build_tiny_t5_tokenizer()
        return PixArtAlphaPipeline(
            tokenizer=t5_tokenizer, text_encoder=_t5_encoder(len(t5_tokenizer), hidden),
            vae=_tiny_vae(4, 4),  # 8x downsampling: the 256px resolution bins give 32x32 latents
            transformer=build_denoiser("pixart-tiny", seed=seed, perturb=0.05, caption_channels=hidden), scheduler=DDIMScheduler(**ddim),
        )
    if kind in ("sd3", "sd35"):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=build_denoiser(f"{kind}-tiny", seed=seed, perturb=0.05, joint_attention_dim=2 * hidden,
                                       pooled_projection_dim=2 * hidden),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(4, 2, shift_factor=0.0),
            text_encoder=_text_encoder(vocab_size, hidden, True, positions), tokenizer=tokenizer,
            text_encoder_2=_text_encoder(vocab_size, hidden, True, positions), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None,
        )
    from diffusers import FluxPipeline

    t5_tokenizer = build_tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=_tiny_vae(4, 2, shift_factor=0.0), text_encoder=_text_encoder(vocab_size, hidden, False, positions),
        tokenizer=tokenizer, text_encoder_2=_t5_encoder(len(t5_tokenizer), hidden), tokenizer_2=t5_tokenizer,
        transformer=build_denoiser("flux-tiny", seed=seed, perturb=0.05, joint_attention_dim=hidden,
                                   pooled_projection_dim=hidden),
    )
