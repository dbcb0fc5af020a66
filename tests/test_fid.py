"""atc.fid and SD_setup/compute_fid_scores.py with a random network saved in the Inception file format."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cleanfid")
from atc import fid as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TinyInception(torch.nn.Module):
    """Same interface as the TorchScript FID Inception (``layers`` + ``forward(x, return_features)``), 8 features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, kernel_size=13, stride=13), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128).flatten(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / F.INCEPTION_FILENAME
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(path))
    return path


def write_images(folder: Path, shift: float = 0.0, n: int = 16, seed: int = 0) -> Path:
    """``n`` smooth random RGB images (different sizes, as real data), brightened by ``shift``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.uniform(0, 200, size=(4, 4, 3))
        size = (40 + 4 * (i % 3), 48)
        img = Image.fromarray(coarse.astype(np.uint8)).resize(size, Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.float64) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_images")
    ref = write_images(root / "ref")
    same = root / "gen" / "same"
    shutil.copytree(ref, same)
    shifted = write_images(root / "gen" / "shifted", shift=40.0)
    return ref, same, shifted


def brute_force_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance via symmetric eigendecompositions: tr sqrt(S1 S2) = tr sqrt(S1^½ S2 S1^½)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def test_features_match_manual_clean_resize(weights, image_sets):
    ref, _, _ = image_sets
    extractor = F.load_inception(weights)
    feats = F.folder_features(ref, extractor, batch_size=5)
    assert feats.shape == (16, 8)
    # Independent path: PIL bicubic on each float channel to 299x299, then the network's layers.
    network = torch.jit.load(str(weights))
    img = np.asarray(Image.open(ref / "001.png").convert("RGB"), dtype=np.float32)
    channels = [np.asarray(Image.fromarray(img[:, :, c], mode="F").resize((299, 299), Image.BICUBIC)) for c in range(3)]
    x = torch.from_numpy(np.clip(np.stack(channels), 0, 255)).unsqueeze(0)
    with torch.no_grad():
        expected = network.layers((x - 128) / 128).flatten(1).double().numpy()
    np.testing.assert_allclose(feats[1], expected[0], rtol=1e-4, atol=1e-5)


def test_fid_sanity(weights, image_sets):
    ref, same, shifted = image_sets
    extractor = F.load_inception(weights)
    f_ref, f_same, f_shift = (F.folder_features(d, extractor) for d in (ref, same, shifted))
    identical = F.fid_from_features(f_ref, f_same)
    moved = F.fid_from_features(f_ref, f_shift)
    assert abs(identical) < 1e-6
    assert moved > 1e-3 and moved > 1000 * abs(identical)
    assert moved == pytest.approx(brute_force_fid(f_ref, f_shift), rel=1e-6, abs=1e-9)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, monkeypatch, weights):
    monkeypatch.delenv(F.INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--inception_weights") as err:
        F.resolve_inception_weights(tmp_path / "missing.pt")
    assert F.INCEPTION_URL in str(err.value)
    monkeypatch.setenv(F.INCEPTION_ENV, str(weights.parent))  # a folder holding the file works too
    assert F.resolve_inception_weights() == weights
    bogus = tmp_path / "bogus.pt"
    torch.save({"state": torch.zeros(2)}, bogus)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        F.load_inception(bogus)


def test_corrupt_image_names_the_file(tmp_path, weights):
    folder = write_images(tmp_path / "imgs", n=3)
    (folder / "001.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="001.png"):
        F.folder_features(folder, F.load_inception(weights))


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "SD_setup" / "compute_fid_scores.py"), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_compute_fid_scores_csv(tmp_path, weights, image_sets):
    ref, same, shifted = image_sets
    gen = tmp_path / "generations"
    shutil.copytree(same.parent, gen)
    (gen / "empty_experiment").mkdir()
    durations = {"same": [1.0, 2.0, 3.0], "shifted": [0.5, 0.5]}
    for name, ds in durations.items():
        meta = {"args": {"merge_fn_str": "atc", "reduction_ratio": 0.5 if name == "same" else 0.3,
                         "linkage": "average"}, "durations": {f"{i}.png": d for i, d in enumerate(ds)}}
        (gen / name / "generation.json").write_text(json.dumps(meta))
    out = tmp_path / "fid.csv"
    proc = run_script("--mode", "clean", "--im_val_dir", str(ref), "--sd_gen_dir", str(gen),
                      "--inception_weights", str(weights), "--output_csv", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["experiment"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"same", "shifted"}
    assert abs(float(rows["same"]["fid"])) < 1e-6 < float(rows["shifted"]["fid"])
    assert float(rows["same"]["duration_mean"]) == pytest.approx(2.0)
    assert float(rows["same"]["duration_std"]) == pytest.approx(np.std([1.0, 2.0, 3.0]))
    assert rows["shifted"]["num_images"] == "16"
    assert out.with_suffix(".png").is_file()


def test_compute_fid_scores_without_weights(tmp_path, image_sets):
    ref, same, _ = image_sets
    proc = run_script("--im_val_dir", str(ref), "--sd_gen_dir", str(same.parent),
                      "--inception_weights", str(tmp_path / "nope" / F.INCEPTION_FILENAME))
    assert proc.returncode != 0
    assert "Inception weights for FID not found" in proc.stderr and "Traceback" not in proc.stderr
