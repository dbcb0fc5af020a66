"""The digits generation miniature (reproduce_digits_generation.py, atc.sd.digits_diffusion): the pipeline end to
end at a tiny size, its resume, its errors, and its metrics against independent references."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg

pytest.importorskip("diffusers")
pytest.importorskip("cleanfid")
from atc.sd import digits_diffusion as dd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--widths", "8", "16", "--context_dim", "16", "--train_steps", "20", "--batch_size", "32", "--warmup_steps",
        "5", "--per_class", "2", "--sampling_steps", "3", "--ratios", "0", "0.5", "--methods", "none", "tome",
        "atc_average", "--seeds", "0", "1", "--threads", "1"]
KEY = ["seed", "method", "linkage", "ratio", "options"]


def _load():
    spec = importlib.util.spec_from_file_location("reproduce_digits_generation", ROOT / "reproduce_digits_generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _read(path: Path) -> pd.DataFrame:
    text = {"method": str, "linkage": str, "options": str, "note": str, "model": str}
    return pd.read_csv(path, dtype=text).fillna({k: "" for k in text})


@pytest.fixture
def one_thread():
    """For the tests that train or sample without the script (which has --threads): these models are tiny, one
    thread is as fast on idle cores and far faster on busy ones (idle OpenMP workers spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def judge() -> dd.DigitsJudge:
    return dd.DigitsJudge.fit(seed=0)


def test_pipeline_end_to_end_and_resume(tmp_path, monkeypatch):
    job = _load()
    out = tmp_path / "gen"
    assert job.cli(["--output_dir", str(out), *TINY]) == 0
    frame = _read(out / "results.csv")
    # per seed: the real digits, no merging, ToMe-SD and ATC at ratios 0 and 0.5
    assert len(frame) == 2 * 6 and frame.groupby("seed").size().eq(6).all()
    assert set(frame.method) == {"real", "none", "tome", "atc"}
    assert (frame.images[frame.method != "real"] == 20).all()

    def row(seed, method, ratio):
        return frame[(frame.seed == seed) & (frame.method == method) & (frame.ratio == ratio)].iloc[0]

    for seed in (0, 1):
        assert row(seed, "none", 0).mse == 0 and np.isinf(row(seed, "none", 0).psnr_db)
        # ratio 0 merges nothing: the same noise and classes give exactly the unmerged samples
        assert row(seed, "tome", 0).mse == 0 and row(seed, "atc", 0).mse == 0
        assert row(seed, "tome", 0.5).mse > 0 and row(seed, "atc", 0.5).mse > 0
        assert row(seed, "atc", 0.5).psnr_db == pytest.approx(10 * np.log10(1 / row(seed, "atc", 0.5).mse), abs=1e-3)

    # Self-attention tokens per block: the UNet has 64 tokens (8x8) in its full-resolution blocks and 16 (4x4) in
    # the middle; only the full-resolution ones (max_downsample 1) lose int(64 * ratio) tokens.
    blocks = sorted(c for c in frame.columns if c.startswith("tokens_block"))
    unmerged = list(row(0, "none", 0)[blocks])
    assert sorted(unmerged) == [16, 64, 64, 64]
    for method in ("tome", "atc"):
        assert list(row(0, method, 0.5)[blocks]) == [64 - int(64 * 0.5) if t == 64 else t for t in unmerged]

    real = frame[frame.method == "real"]
    assert (real.class_acc > 90).all(), "the judge must recognise the held-out real digits"
    md = (out / "results.md").read_text()
    atc_half = frame[(frame.method == "atc") & (frame.ratio == 0.5)].class_acc
    assert f"{atc_half.mean():.2f} ± {atc_half.std():.2f}" in md and "| ATC average | 0.5 |" in md
    assert "| ToMe-SD | 0.5 |" in md and "2 seed(s)" in md
    assert (out / "results.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000

    # A rerun computes nothing: no training, no sampling, the same table.
    before = (out / "results.csv").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    with monkeypatch.context() as m:
        m.setattr(dd, "train_denoiser", forbidden)
        m.setattr(dd, "sample_images", forbidden)
        assert job.cli(["--output_dir", str(out), *TINY]) == 0
    assert (out / "results.csv").read_text() == before

    # A lost row (an interrupted run) is recomputed to the same values with the cached denoiser (not retrained).
    checkpoint = out / "seed1" / "denoiser.pth"
    stamp = checkpoint.stat().st_mtime_ns
    lost = (frame.seed == 1) & (frame.method == "atc") & (frame.ratio == 0.5)
    frame[~lost].to_csv(out / "results.csv", index=False)
    assert job.cli(["--output_dir", str(out), *TINY]) == 0
    again = _read(out / "results.csv")
    assert checkpoint.stat().st_mtime_ns == stamp
    metrics = ["mse", "class_acc", "fid"]
    pd.testing.assert_frame_equal(again.set_index(KEY).sort_index()[metrics],
                                  frame.set_index(KEY).sort_index()[metrics])

    # Other image-affecting flags in the same folder are refused, naming the flag.
    flags = [*TINY]
    flags[flags.index("--sampling_steps") + 1] = "4"
    assert job.cli(["--output_dir", str(out), *flags]) == 2


def test_dit_is_trained_and_merged(tmp_path):
    """DiT (class labels native): every block is patched; a merging row has fewer tokens and deviates."""
    job = _load()
    out = tmp_path / "dit"
    flags = ["--model", "dit", "--widths", "16", "--patch_size", "2", "--train_steps", "10", "--batch_size", "16",
             "--warmup_steps", "2", "--per_class", "1", "--sampling_steps", "2", "--ratios", "0.5", "--methods",
             "none", "atc_average", "tome", "--seeds", "0", "--threads", "1",
             "--patch_options", "", "plan=\"group\""]
    assert job.cli(["--output_dir", str(out), *flags]) == 0
    frame = _read(out / "results.csv")
    assert sorted(set(frame.method)) == ["atc", "none", "real", "tome"]
    merged = frame[frame.method == "atc"]
    assert len(merged) == 2 and sorted(merged.options) == ["", "plan=\"group\""]
    tokens = [c for c in frame.columns if c.startswith("tokens_block")]
    none = frame[frame.method == "none"].iloc[0]
    assert all(none[c] == 16 for c in tokens) and all((merged[c] == 8).all() for c in tokens)
    assert (merged.mse > 0).all() and not (merged.note == "nothing merged").any()


@pytest.mark.parametrize("flags, message", [
    (["--methods", "tome", "--ratios", "0.8"], "ToMe-SD at ratio 0.8"),
    (["--patch_options", "no_such_option=1"], "no_such_option"),
    (["--patch_options", "merge_mlp"], "key=value"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--widths", "12", "24"], "--widths"),
    (["--resolution", "12"], "--resolution"),
    (["--sample_batch", "3"], "--sample_batch"),
])
def test_bad_flags_fail_clearly(tmp_path, capsys, flags, message):
    job = _load()
    assert job.cli(["--output_dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_help_describes_every_flag():
    parser = _load().get_args_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no --help text"


# ----------------------------------------------------------------------------------------------------- metrics
def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets, written out from its definition."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # dead ReLU units: singular covariances
        root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_real_vs_real_is_zero_and_matches_the_definition(judge):
    real, labels = dd.digits_images("all")
    assert dd.judge_fid(judge, real, real) == pytest.approx(0.0, abs=1e-6)
    # two disjoint halves of the real digits are close; noise is far from them
    first, second = real[0::2], real[1::2]
    halves = dd.judge_fid(judge, first, second)
    noise = torch.rand_like(first) * 2 - 1
    assert halves == pytest.approx(_frechet_reference(judge.features(first), judge.features(second)), rel=1e-6)
    far = dd.judge_fid(judge, first, noise)
    assert far == pytest.approx(_frechet_reference(judge.features(first), judge.features(noise)), rel=1e-6)
    assert halves < far / 20


def test_judge_features_are_the_mlp_hidden_layer(judge):
    images, labels = dd.digits_images("val")
    assert judge.val_accuracy > 0.9
    assert dd.class_accuracy(judge, images, labels) == pytest.approx(judge.val_accuracy)
    feats = judge.features(images)
    logits = feats @ judge.mlp.coefs_[1] + judge.mlp.intercepts_[1]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    x = (dd.to_unit(images).reshape(len(images), -1) * 16).double().numpy()
    np.testing.assert_allclose(probs, judge.mlp.predict_proba(x), rtol=1e-6, atol=1e-9)
    # an upsampled image is judged from its 8x8 area average: the 2x upsampled digits keep their labels
    up, _ = dd.digits_images("val", resolution=16)
    assert up.shape == (360, 1, 16, 16) and dd.class_accuracy(judge, up, labels) > 0.85


def test_paired_mse_and_psnr_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 1, 4, 4, generator=gen) * 2 - 1, torch.rand(5, 1, 4, 4, generator=gen) * 2 - 1
    expected = np.mean([np.mean([((float(a[i, 0, y, x]) + 1) / 2 - (float(b[i, 0, y, x]) + 1) / 2) ** 2
                                 for y in range(4) for x in range(4)]) for i in range(5)])
    assert dd.paired_mse(a, b) == pytest.approx(expected, rel=1e-6)
    assert dd.paired_mse(a, a) == 0 and dd.psnr(0.0) == float("inf") and dd.psnr(0.01) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="same shape"):
        dd.paired_mse(a, b[:4])


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, one_thread):
    images, labels = dd.digits_images("train")
    config = dd.DenoiserConfig(widths=(8, 16), context_dim=16)
    train = dd.TrainConfig(steps=6, batch_size=16, warmup=2, save_every=3)

    def trained(path, interrupt: bool) -> dict:
        torch.manual_seed(0)
        model = dd.build_digits_denoiser(config)
        if interrupt:  # killed right after the checkpoint of step 3
            original = dd.atomic_save

            def save_then_die(obj, target):
                original(obj, target)
                raise KeyboardInterrupt

            with monkeypatch.context() as m:
                m.setattr(dd, "atomic_save", save_then_die)
                with pytest.raises(KeyboardInterrupt):
                    dd.train_denoiser(model, images, labels, train, path, progress=False)
            assert torch.load(path, weights_only=False)["step"] == 3
            torch.manual_seed(1)  # the resumed run must not depend on the global RNG
            model = dd.build_digits_denoiser(config)
        info = dd.train_denoiser(model, images, labels, train, path, progress=False)
        assert info["steps"] == 6
        return model.state_dict()

    straight = trained(tmp_path / "straight.pth", interrupt=False)
    resumed = trained(tmp_path / "resumed.pth", interrupt=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    loaded = dd.load_denoiser(config, tmp_path / "resumed.pth").state_dict()
    assert all(torch.equal(straight[k], loaded[k]) for k in straight)
    # the checkpoint holds the settings it was trained with: other settings are refused, not silently reused
    with pytest.raises(ValueError, match="other settings"):
        dd.train_denoiser(dd.build_digits_denoiser(config), images, labels, dd.TrainConfig(steps=7, batch_size=16),
                          tmp_path / "straight.pth", progress=False)


def test_digits_images_and_balanced_classes():
    images, labels = dd.digits_images("train")
    assert images.shape == (1437, 1, 8, 8) and images.min() == -1 and images.max() == 1
    assert torch.equal(torch.bincount(dd.balanced_classes(3)), torch.full((10,), 3))
    assert torch.equal(dd.initial_noise(4, 8, seed=3), dd.initial_noise(4, 8, seed=3))


def test_sampling_is_a_function_of_noise_and_class(one_thread):
    """DDIM with eta 0: the same noise and class give the same image whatever the batch it is sampled in (the
    pairing behind the paired deviation), and guidance 1 is the conditional prediction alone."""
    torch.manual_seed(0)
    config = dd.DenoiserConfig(widths=(8, 16), context_dim=16)
    model = dd.build_digits_denoiser(config).eval()
    noise, classes = dd.initial_noise(6, 8, seed=1), dd.balanced_classes(1)[:6]
    tcfg = dd.TrainConfig()
    whole = dd.sample_images(model, noise, classes, tcfg, steps=3)
    chunked = dd.sample_images(model, noise, classes, tcfg, steps=3, batch_size=2)
    torch.testing.assert_close(whole, chunked, rtol=1e-4, atol=1e-5)
    assert whole.shape == (6, 1, 8, 8) and torch.isfinite(whole).all()
    guided = dd.sample_images(model, noise, classes, tcfg, steps=3, guidance_scale=3.0)
    assert not torch.allclose(guided, whole)


def test_patch_options_parse_json_values_with_commas_inside():
    parse = _load().parse_options
    assert parse("") == {}
    assert parse('plan="group", reuse_steps=5') == {"plan": "group", "reuse_steps": 5}
    assert parse("tile=[4,4],merge_mlp=true,plan=group") == {"tile": [4, 4], "merge_mlp": True, "plan": "group"}
    assert parse('a="x,y",b={"c": [1, 2]}') == {"a": "x,y", "b": {"c": [1, 2]}}
