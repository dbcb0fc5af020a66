"""A small class-conditional diffusion model trained on scikit-learn's bundled digits, and what it takes to score
token merging on it without downloading anything: the miniature of the paper's Stable Diffusion table
(``reproduce_digits_generation.py`` is its command line).

    import atc.patch
    from atc.sd.digits_diffusion import *
    images, labels = digits_images("train", resolution=8)           # (1437, 1, 8, 8) in [-1, 1], (1437,)
    model = build_digits_denoiser(DenoiserConfig(model="unet", resolution=8))
    train = TrainConfig(steps=800)
    train_denoiser(model, images, labels, train, "denoiser.pth")    # cached: a rerun loads it
    noise, classes = initial_noise(500, 8, seed=0), balanced_classes(50)
    atc.patch.diffusers(model.backbone, method="atc", ratio=0.5)    # .backbone: the diffusers UNet
    samples = sample_images(model, noise, classes, train, steps=20) # (500, 1, 8, 8) in [-1, 1]
    judge = DigitsJudge.fit(seed=0)                                  # an MLP on the real 8x8 digits
    real, _ = digits_images("val")
    class_accuracy(judge, samples, classes), judge_fid(judge, real, samples)

The denoisers are diffusers' own classes (``UNet2DConditionModel``; ``DiTTransformer2DModel``), trained with
diffusers' ``DDPMScheduler`` (epsilon prediction) and sampled with ``DDIMScheduler`` (eta 0, so a sample is a
deterministic function of its initial noise and class: every merge setting can be compared image by image with
the unmerged sample of the same noise). The class conditions the UNet as a one-token cross-attention context (an
embedding of the label), so its transformer blocks look like Stable Diffusion's: self-attention over the latent
grid, cross-attention to the condition, MLP. Classifier-free guidance: the label is replaced by a null class for
``label_dropout`` of the training samples, and ``sample_images(guidance_scale=...)`` mixes the conditional and
unconditional predictions (``1.0``: conditional only, no guidance).

The judge is a small scikit-learn MLP trained on the real 8x8 digits; its predicted class scores class accuracy,
and its hidden layer is the feature space for FID (clean-fid's Fréchet distance, as :func:`atc.fid.fid_from_features`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc.cli import ConfigError
from atc.utils import atomic_save

__all__ = [
    "NUM_CLASSES", "NULL_CLASS", "DENOISERS", "DenoiserConfig", "TrainConfig", "ClassConditionalUNet",
    "ClassConditionalDiT", "build_digits_denoiser", "digits_images", "train_denoiser", "load_denoiser", "sample_images",
    "balanced_classes", "initial_noise", "attention_tokens", "DigitsJudge", "paired_mse", "psnr",
    "class_accuracy", "judge_fid", "to_unit",
]

NUM_CLASSES = 10
#: The label that stands for "no class" (classifier-free guidance): the embedding table has one extra row.
NULL_CLASS = NUM_CLASSES
DIGITS_SIDE = 8  # scikit-learn's digits are 8x8 grey images with values 0..16
DIGITS_MAX = 16.0


# ------------------------------------------------------------------------------------------------------- data
def digits_images(split: str = "train", resolution: int = DIGITS_SIDE) -> tuple[Tensor, Tensor]:
    """Real digits as ``(N, 1, R, R)`` float32 in ``[-1, 1]`` and labels ``(N,)`` int64.

    ``split``: ``"train"`` (1437 images) or ``"val"`` (360), the fixed stratified split of
    :func:`atc.data.digits.digits_split_indices` that the classification table uses, or ``"all"`` (1797).
    ``resolution`` > 8 upsamples the 8x8 grid bilinearly (``resolution`` must be a multiple of 8).
    """
    from sklearn.datasets import load_digits

    from atc.data.digits import digits_split_indices

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if resolution < DIGITS_SIDE or resolution % DIGITS_SIDE:
        raise ConfigError(f"--resolution must be a multiple of {DIGITS_SIDE} (the digits' own grid), got {resolution}")
    digits = load_digits()
    idx = np.arange(len(digits.target)) if split == "all" else digits_split_indices(split)
    images = torch.from_numpy(digits.images[idx]).float().unsqueeze(1) / DIGITS_MAX * 2 - 1
    if resolution != DIGITS_SIDE:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.contiguous(), torch.from_numpy(digits.target[idx]).long()


def to_unit(images: Tensor) -> Tensor:
    """``[-1, 1]`` model space -> ``[0, 1]`` pixel space (clipped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def balanced_classes(per_class: int) -> Tensor:
    """``(10 * per_class,)`` labels ``0, 1, ..., 9, 0, 1, ...``: every class equally often."""
    return torch.arange(NUM_CLASSES).repeat(per_class)


def initial_noise(num: int, resolution: int, seed: int) -> Tensor:
    """The ``(num, 1, R, R)`` standard normal starting noise of a sampling run, a function of ``seed`` only."""
    return torch.randn(num, 1, resolution, resolution, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- models
@dataclass
class DenoiserConfig:
    """The denoiser's shape. ``model``: a key of :data:`DENOISERS`. ``widths``: channels per UNet level (the first
    level, at full resolution, holds the transformer blocks) or, for DiT, ``(width,)``. ``depth``: UNet layers per
    block / DiT blocks. ``context_dim``: width of the one-token class context of the UNet's cross-attention."""

    model: str = "unet"
    resolution: int = DIGITS_SIDE
    widths: tuple[int, ...] = (32, 64)
    depth: int = 1
    head_dim: int = 8
    context_dim: int = 64
    patch_size: int = 1  # DiT only: the token grid is resolution / patch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


class ClassConditionalUNet(nn.Module):
    """diffusers' ``UNet2DConditionModel`` conditioned on a digit class through a one-token cross-attention context.

    ``forward(x (B, 1, R, R), t (B,) or scalar, labels (B,)) -> predicted noise (B, 1, R, R)``. The UNet is the
    attribute ``.unet``, so ``atc.patch.diffusers(model, ...)`` patches it as it patches a pipeline.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        widths = tuple(config.widths)
        if len(widths) < 2:
            raise ConfigError(f"the UNet needs at least two levels (--widths A B), got {list(widths)}")
        # Stable Diffusion's layout, scaled down: transformer blocks (self-attention, cross-attention to the
        # condition, MLP) at full resolution, plain ResNet blocks at the lowest level, a transformer in the middle.
        down = ("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1)
        self.unet = UNet2DConditionModel(
            sample_size=config.resolution, in_channels=1, out_channels=1, block_out_channels=widths,
            layers_per_block=config.depth, down_block_types=down, up_block_types=up,
            cross_attention_dim=config.context_dim, attention_head_dim=[w // config.head_dim for w in widths],
            norm_num_groups=8,
        )
        self.class_embedding = nn.Embedding(NUM_CLASSES + 1, config.context_dim)

    @property
    def backbone(self) -> nn.Module:
        """The diffusers model, what ``atc.patch.diffusers`` patches."""
        return self.unet

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        context = self.class_embedding(labels).unsqueeze(1)  # (B, 1, context_dim)
        return self.unet(x, t, encoder_hidden_states=context).sample


class ClassConditionalDiT(nn.Module):
    """diffusers' ``DiTTransformer2DModel``: class labels are native to it (adaLN-Zero conditioning, with its own
    null class ``NUM_CLASSES`` for classifier-free guidance). Same ``forward`` as :class:`ClassConditionalUNet`;
    the transformer is ``.transformer``."""

    def __init__(self, config: DenoiserConfig) -> None:
        from diffusers import DiTTransformer2DModel

        super().__init__()
        width = config.widths[0]
        if config.resolution % config.patch_size:
            raise ConfigError(f"--patch_size {config.patch_size} does not divide --resolution {config.resolution}")
        self.transformer = DiTTransformer2DModel(
            num_attention_heads=width // config.head_dim, attention_head_dim=config.head_dim, in_channels=1,
            out_channels=1, num_layers=config.depth, sample_size=config.resolution, patch_size=config.patch_size,
            num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1,
        )
        # DiT drops labels itself during training (10 %, to its null class): train it with label_dropout=0.

    @property
    def backbone(self) -> nn.Module:
        """The diffusers model, what ``atc.patch.diffusers`` patches."""
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.transformer(x, t, class_labels=labels).sample


#: ``--model`` choices: name -> class built from a :class:`DenoiserConfig`.
DENOISERS: dict[str, Callable[[DenoiserConfig], nn.Module]] = {
    "unet": ClassConditionalUNet,
    "dit": ClassConditionalDiT,
}


def build_digits_denoiser(config: DenoiserConfig) -> nn.Module:
    if config.model not in DENOISERS:
        raise ConfigError(f"unknown --model {config.model!r}; choose from {', '.join(DENOISERS)}")
    if config.resolution < DIGITS_SIDE or config.resolution % DIGITS_SIDE:
        raise ConfigError(f"--resolution must be a multiple of {DIGITS_SIDE} (the digits' own grid), "
                          f"got {config.resolution}")
    if any(w % config.head_dim or w % 8 for w in config.widths):
        raise ConfigError(f"--widths {list(config.widths)} must be multiples of 8 and of --head_dim {config.head_dim}")
    return DENOISERS[config.model](config)


# --------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """DDPM training: ``steps`` AdamW steps of ``batch_size`` images, lr warmed up linearly over ``warmup`` steps
    then cosine to 0; ``label_dropout``: fraction of labels replaced by the null class (classifier-free guidance)."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.0
    label_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    seed: int = 0
    save_every: int = 100

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "save_every"}


def noise_scheduler(config: TrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         clip_sample=True)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_denoiser(
    model: nn.Module, images: Tensor, labels: Tensor, config: TrainConfig, checkpoint: str | Path,
    meta: dict[str, Any] | None = None, progress: bool = True, log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Train ``model`` (in place) to predict the noise added to ``images`` at random DDPM timesteps.

    Resumable: the state (model, optimiser, step, the trainer's random generator) is saved atomically to
    ``checkpoint`` every ``config.save_every`` steps and at the end; a checkpoint that already holds every step
    is loaded and nothing is trained. ``meta`` (e.g. the model config) is stored with it and must match on a
    rerun, so a cached model is never reused for other settings. Returns ``{"steps", "loss", "seconds"}`` (loss:
    mean of the last 50 steps; seconds: training time of this call plus earlier interrupted calls).
    """
    checkpoint = Path(checkpoint)
    meta = {**(meta or {}), "train": config.to_dict()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    scheduler = noise_scheduler(config)
    alphas = scheduler.alphas_cumprod.float()
    state: dict[str, Any] = {"step": 0, "losses": [], "seconds": 0.0}
    if checkpoint.is_file():
        saved = load_denoiser_checkpoint(checkpoint, meta)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        state = {k: saved[k] for k in state}
    if state["step"] >= config.steps:
        model.eval()
        return {"steps": state["step"], "loss": float(np.mean(state["losses"][-50:])), "seconds": state["seconds"]}

    def save() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": generator.get_state(), "meta": meta, **state}, checkpoint)

    from tqdm import tqdm

    model.train()
    start, seconds0 = time.perf_counter(), state["seconds"]
    n = len(images)
    bar = tqdm(range(state["step"], config.steps), desc="training the denoiser", disable=not progress,
               dynamic_ncols=True, leave=False, initial=state["step"], total=config.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        idx = torch.randint(n, (config.batch_size,), generator=generator)
        x0, y = images[idx], labels[idx].clone()
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(config.num_train_timesteps, (config.batch_size,), generator=generator)
        if config.label_dropout > 0:
            y[torch.rand(config.batch_size, generator=generator) < config.label_dropout] = NULL_CLASS
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(noisy, t, y), noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"denoiser loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["losses"].append(loss.item())
        state["step"] = step + 1
        state["seconds"] = seconds0 + time.perf_counter() - start
        bar.set_postfix(loss=f"{np.mean(state['losses'][-20:]):.4f}")
        if state["step"] % config.save_every == 0 or state["step"] == config.steps:
            save()
    bar.close()
    model.eval()
    return {"steps": state["step"], "loss": float(np.mean(state["losses"][-50:])), "seconds": state["seconds"]}


def load_denoiser_checkpoint(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Read a denoiser checkpoint and check it was trained with ``meta`` (else a ConfigError naming the fix)."""
    from atc.checkpoint import read_checkpoint

    saved = read_checkpoint(path, "denoiser checkpoint")
    if not isinstance(saved, dict) or "model" not in saved or "meta" not in saved:
        raise ConfigError(f"{path} is not a denoiser checkpoint of this script: delete it or use another --output_dir")
    if saved["meta"] != meta:
        diff = sorted(k for k in set(saved["meta"]) | set(meta) if saved["meta"].get(k) != meta.get(k))
        raise ConfigError(
            f"{path} was trained with other settings ({', '.join(diff)} differ: {saved['meta']} vs {meta}); use "
            "another --output_dir or delete the file to train again")
    return saved


def load_denoiser(config: DenoiserConfig, path: str | Path) -> nn.Module:
    """A trained denoiser from a checkpoint written by :func:`train_denoiser` (eval mode)."""
    from atc.checkpoint import read_checkpoint

    model = build_digits_denoiser(config)
    model.load_state_dict(read_checkpoint(path, "denoiser checkpoint")["model"])
    return model.eval()


# --------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_images(
    model: nn.Module, noise: Tensor, labels: Tensor, train_config: TrainConfig, steps: int = 20,
    guidance_scale: float = 1.0, batch_size: int | None = None,
) -> Tensor:
    """DDIM sampling (eta 0) from ``noise (N, 1, R, R)`` for classes ``labels (N,)``: ``(N, 1, R, R)`` in ``[-1, 1]``.

    ``guidance_scale`` != 1 runs the null class alongside (one batch of ``2N``, as Stable Diffusion pipelines do)
    and returns ``uncond + s * (cond - uncond)``. ``batch_size`` splits the ``N`` images into chunks (``None``:
    one chunk). The result depends only on the inputs (and, for ToMe-SD's random destinations, on the patch's
    generator: reseed it before each run).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler(train_config).config, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    model.eval()
    chunks = []
    size = batch_size or len(noise)
    for start in range(0, len(noise), size):
        x, y = noise[start:start + size].clone(), labels[start:start + size]
        guided = guidance_scale != 1.0
        y_in = torch.cat([y, torch.full_like(y, NULL_CLASS)]) if guided else y
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            eps = model(x_in, t.expand(len(x_in)), y_in)
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        chunks.append(x)
    return torch.cat(chunks)


@contextmanager
def attention_tokens(model: nn.Module) -> Iterator[dict[str, int]]:
    """Record, per diffusers ``BasicTransformerBlock`` of ``model``, the number of tokens its self-attention last
    ran on: after a patched forward, the merged count (this hook runs after the patch's, which merges the input).

    Yields ``{block name: tokens}`` in module order, filled in during the ``with`` body (0 for a block that did not
    run); the hooks are removed on exit.
    """
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]
    tokens = {name: 0 for name, _ in blocks}
    handles = []
    for name, block in blocks:
        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            tokens[name] = int(x.shape[1])

        handles.append(block.attn1.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield tokens
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------- metrics
class DigitsJudge:
    """A scikit-learn MLP (one ReLU hidden layer) trained on the real 8x8 digits: its predictions score class
    accuracy, its hidden layer is the feature space for FID. Images of any resolution are area-averaged to 8x8.
    """

    def __init__(self, mlp: Any, val_accuracy: float) -> None:
        self.mlp = mlp
        self.val_accuracy = val_accuracy

    @classmethod
    def fit(cls, seed: int = 0, hidden: int = 64) -> "DigitsJudge":
        """Train on the train split, report accuracy on the val split (``val_accuracy``, in [0, 1])."""
        from sklearn.neural_network import MLPClassifier

        x_train, y_train = digits_images("train")
        x_val, y_val = digits_images("val")
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=1000, random_state=seed)
        mlp.fit(cls._inputs(x_train), y_train.numpy())
        judge = cls(mlp, 0.0)
        judge.val_accuracy = float((judge.predict(x_val) == y_val).float().mean())
        return judge

    @staticmethod
    def _inputs(images: Tensor) -> np.ndarray:
        """``(N, 1, R, R)`` in ``[-1, 1]`` -> ``(N, 64)`` on the digits' own 0..16 scale."""
        x = to_unit(images)
        if x.shape[-1] != DIGITS_SIDE:
            x = F.adaptive_avg_pool2d(x, DIGITS_SIDE)
        return (x.reshape(len(x), -1) * DIGITS_MAX).double().numpy()

    def predict(self, images: Tensor) -> Tensor:
        """Predicted classes ``(N,)``."""
        return torch.from_numpy(self.mlp.predict(self._inputs(images))).long()

    def features(self, images: Tensor) -> np.ndarray:
        """Hidden-layer activations ``(N, hidden)`` float64 (ReLU of the first layer)."""
        x = self._inputs(images)
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)


def paired_mse(images: Tensor, reference: Tensor) -> float:
    """Mean over images of the per-image mean squared error in ``[0, 1]`` pixel space (0 for identical sets)."""
    if images.shape != reference.shape:
        raise ValueError(f"paired images must have the same shape, got {tuple(images.shape)} and {tuple(reference.shape)}")
    return float(((to_unit(images) - to_unit(reference)) ** 2).flatten(1).mean(1).mean())


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]; ``inf`` for ``mse == 0``."""
    return math.inf if mse <= 0 else 10 * math.log10(1.0 / mse)


def class_accuracy(judge: DigitsJudge, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` that ``judge`` labels as their requested class ``labels``."""
    return float((judge.predict(images) == labels).float().mean())


def judge_fid(judge: DigitsJudge, reference: Tensor, images: Tensor) -> float:
    """Fréchet distance between ``reference`` and ``images`` in the judge's feature space (clean-fid's formula)."""
    import warnings

    from atc.fid import fid_from_features

    with warnings.catch_warnings():
        # fewer images than features (smoke runs) make the covariances singular: the number is then only a
        # rough one, which scipy's sqrtm warns about on every call
        warnings.filterwarnings("ignore", message="Matrix is singular")
        return fid_from_features(judge.features(reference), judge.features(images))
