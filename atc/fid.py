"""FID between image folders with clean-fid's "clean" protocol and the standard Inception network, offline.

    from atc.fid import load_inception, folder_features, fid_from_features
    extractor = load_inception("/path/to/inception-2015-12-05.pt")        # or $ATC_INCEPTION_WEIGHTS
    ref = folder_features("imagenet_val_ref/", extractor)                   # (N, 2048) numpy
    gen = folder_features("sd_generations/atc_average_r0.5_md1_attn/", extractor)
    fid = fid_from_features(ref, gen)

The feature network is the TensorFlow FID Inception-v3 as a TorchScript file, ``inception-2015-12-05.pt``
(the file clean-fid and StyleGAN2-ADA use; see :data:`INCEPTION_URL`). Nothing is downloaded here: put the
file somewhere and pass its path, or set ``$ATC_INCEPTION_WEIGHTS``, or place it at :data:`DEFAULT_WEIGHTS`.
Image loading, the "clean" resize (PIL bicubic on float32 channels to 299×299) and the Fréchet distance are
clean-fid's own functions (``cleanfid.resize.build_resizer``, ``cleanfid.fid.fid_from_feats``), so the numbers
match ``cleanfid.fid.compute_fid(mode="clean")``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_FILENAME",
    "INCEPTION_ENV",
    "DEFAULT_WEIGHTS",
    "FID_MODES",
    "resolve_inception_weights",
    "load_inception",
    "list_images",
    "folder_features",
    "fid_from_features",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "ATC_INCEPTION_WEIGHTS"
DEFAULT_WEIGHTS = Path.home() / ".cache" / "atc" / INCEPTION_FILENAME
FID_MODES = ("clean",)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")

FeatureExtractor = Callable[[Tensor], Tensor]


def _cleanfid():
    try:
        import cleanfid.fid
        import cleanfid.resize
        import cleanfid.utils
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("FID needs clean-fid: `pip install -r requirements/sd.txt` (clean-fid==0.1.35)") from err
    return cleanfid


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$ATC_INCEPTION_WEIGHTS``, else :data:`DEFAULT_WEIGHTS`.

    Raises a ``FileNotFoundError`` that says where to get the file and where to put it.
    """
    source = "argument" if path else ("$" + INCEPTION_ENV if os.environ.get(INCEPTION_ENV) else "default location")
    candidate = Path(path or os.environ.get(INCEPTION_ENV) or DEFAULT_WEIGHTS).expanduser()
    if candidate.is_dir():
        candidate = candidate / INCEPTION_FILENAME
    if not candidate.is_file():
        raise FileNotFoundError(
            f"Inception weights for FID not found at {candidate} ({source}). Download {INCEPTION_FILENAME} "
            f"(about 95 MB) from {INCEPTION_URL} on a machine with internet access, then pass its path with "
            f"--inception_weights, set ${INCEPTION_ENV}, or put it at {DEFAULT_WEIGHTS}."
        )
    return candidate


def load_inception(
    path: str | os.PathLike | None = None, device: torch.device | str = "cpu", mode: str = "clean"
) -> FeatureExtractor:
    """Load the TorchScript Inception from a local file; returns ``f(images) -> features``.

    ``images``: ``(B, 3, 299, 299)`` float in ``[0, 255]`` (clean-fid's resized images); ``features``:
    ``(B, D)`` (D = 2048 for the real network), taken before the classifier, exactly as clean-fid's
    ``InceptionV3W`` does in "clean" mode (normalise to ``[-1, 1]``, run ``layers``).
    """
    if mode not in FID_MODES:
        raise ValueError(f"unknown FID mode {mode!r}: choose one of {list(FID_MODES)} (clean-fid's protocol)")
    weights = resolve_inception_weights(path)
    try:
        network = torch.jit.load(str(weights), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"{weights} is not a TorchScript file ({err.__class__.__name__}): expected {INCEPTION_FILENAME} "
            f"from {INCEPTION_URL}"
        ) from None
    if not hasattr(network, "layers"):
        raise ValueError(
            f"{weights} is a TorchScript file without the `layers` feature network of {INCEPTION_FILENAME}: "
            f"download the FID Inception from {INCEPTION_URL}"
        )
    layers = network.layers

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        if images.shape[-2:] != (299, 299):
            raise ValueError(f"the FID Inception expects 299x299 images, got {tuple(images.shape[-2:])}")
        return layers((images.to(device) - 128) / 128).flatten(1)

    return extract


def list_images(folder: str | os.PathLike) -> list[str]:
    """All image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = {
        f
        for ext in IMAGE_EXTENSIONS
        for pattern in (ext, ext.upper())
        for f in glob.glob(os.path.join(glob.escape(str(folder)), "**", f"*.{pattern}"), recursive=True)
    }
    return sorted(files)


class _ImageDataset(torch.utils.data.Dataset):
    """clean-fid's image loading and resize, with an error that names the file that cannot be read."""

    def __init__(self, files: list[str], mode: str):
        self.dataset = _cleanfid().utils.ResizeDataset(files, mode=mode)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        try:
            return self.dataset[i]
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(
                f"cannot read image {self.dataset.files[i]} ({err}): delete or regenerate it"
            ) from None


def folder_features(
    folder: str | os.PathLike,
    extractor: FeatureExtractor,
    mode: str = "clean",
    batch_size: int = 32,
    num_workers: int = 0,
    description: str | None = None,
) -> np.ndarray:
    """Inception features ``(N, D)`` float64 of the ``N`` images under ``folder``."""
    files = list_images(folder)
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} images; FID needs at least 2 per set")
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(
        _ImageDataset(files, mode), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    feats = [
        extractor(batch).cpu().double().numpy()
        for batch in tqdm(loader, desc=description or f"FID features {Path(folder).name}", leave=False)
    ]
    return np.concatenate(feats)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N1, D)`` and ``(N2, D)`` (clean-fid)."""
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {feats1.shape} and {feats2.shape}")
    if min(len(feats1), len(feats2)) < 2:
        raise ValueError("FID needs at least 2 images per set")
    return float(_cleanfid().fid.fid_from_feats(feats1, feats2))
