"""The main job (reproduce_digits_table.py) end to end on a tiny configuration, its resume and its errors."""

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EMBED, DEPTH, PATCH, SIZE = 64, 3, 4, 32
TINY = ["--epochs", "8", "--lr", "3e-3", "--warmup-epochs", "1", "--finetune-epochs", "1", "--finetune-warmup-epochs",
        "0", "--keep_rates", "0.25", "--methods", "none",
        "tome", "atc_average", "--embed-dim", str(EMBED), "--depth", str(DEPTH), "--num-heads", "2", "--reduction_loc",
        "0", "1", "2", "--throughput-runs", "1", "--input-size", str(SIZE), "--patch-size", str(PATCH), "--seeds", "0",
        "1", "--threads", "1"]


def _load():
    spec = importlib.util.spec_from_file_location("reproduce_digits_table", ROOT / "reproduce_digits_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vit_gflops(tokens_per_block: list[int], classes: int = 10) -> float:
    """Hand count of a timm ViT forward (multiply-add = 2 FLOPs): patch embedding, then per block qkv, q@k^T,
    attn@v, projection and the 4x MLP on that block's tokens (class token included), then the head."""
    patches, c = (SIZE // PATCH) ** 2, EMBED
    flops = 2 * patches * (3 * PATCH * PATCH) * c
    for t in tokens_per_block:
        flops += 2 * t * c * 3 * c + 2 * 2 * t * t * c + 2 * t * c * c + 2 * 2 * t * c * 4 * c
    return (flops + 2 * c * classes) / 1e9


def test_table_end_to_end_resume_and_determinism(tmp_path, capsys):
    job = _load()
    out = tmp_path / "table"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert job.cli(["--output_dir", str(out), *TINY]) == 0
    # ToMe's cap is in the table (below), not a warning that reads like a failure
    assert not [w for w in caught if "cannot remove" in str(w.message)]
    frame = pd.read_csv(out / "results.csv").fillna({"linkage": "", "note": ""})
    # per seed: no reduction, ToMe and ATC at keep 0.25, each off the shelf and fine-tuned
    assert len(frame) == 2 * 3 * 2
    for seed in (0, 1):
        part = frame[frame.seed == seed]
        assert len(part) == 6 and set(part.setting) == {"off-the-shelf", "fine-tuned"}
    assert set(frame.method) == {"none", "tome", "atc"} and set(frame.linkage) == {"", "average"}
    base = frame[(frame.method == "none") & (frame.setting == "off-the-shelf")].top1
    assert (base > 30).all(), f"the base ViT did not learn digits ({list(base)}% top-1; chance is 10%)"

    def config(method, keep_rate):
        return frame[(frame.method == method) & (frame.keep_rate == keep_rate)].iloc[0]

    tokens = ["tokens_after_block0", "tokens_after_block1", "tokens_after_block2"]
    # 64 patch tokens, keep 0.25 -> int(64 * 0.25^i) = 16/4/1 after the three locations
    assert list(config("atc", 0.25)[tokens]) == [16, 4, 1] and config("atc", 0.25).final_tokens == 1
    # ToMe cannot remove more than half the tokens per location: it keeps 32/16/8 at keep 0.25, and says so
    assert list(config("tome", 0.25)[tokens]) == [32, 16, 8] and "capped" in config("tome", 0.25).note
    assert list(config("none", 1.0)[tokens]) == [64, 64, 64]
    # GFLOPs are counted on the reduced model: the unreduced one matches a hand count, fewer tokens cost less
    assert config("none", 1.0).gflops == pytest.approx(_vit_gflops([65] * DEPTH), rel=1e-3)
    assert config("atc", 0.25).gflops < config("tome", 0.25).gflops < config("none", 1.0).gflops
    # the cost of a configuration does not depend on the seed
    assert frame.groupby(["method", "keep_rate"]).gflops.nunique().eq(1).all()

    md = (out / "results.md").read_text()
    assert "| ATC average |" in md and "| ToMe |" in md and "GFLOPs" in md and "2 seed(s)" in md
    atc_ft = frame[(frame.method == "atc") & (frame.setting == "fine-tuned")].top1
    assert f"{atc_ft.mean():.2f} ± {atc_ft.std():.2f}" in md
    assert "ToMe removes at most half" in md
    assert (out / "results.png").stat().st_size > 1000

    # Rerunning skips finished rows; rows lost (e.g. an interrupted run) are recomputed to the same values.
    before = (out / "results.csv").read_text()
    assert job.cli(["--output_dir", str(out), *TINY]) == 0
    assert (out / "results.csv").read_text() == before
    kept = frame[~((frame.seed == 1) & (frame.method == "atc") & (frame.setting == "fine-tuned"))]
    kept.to_csv(out / "results.csv", index=False)
    assert job.cli(["--output_dir", str(out), *TINY]) == 0
    again = pd.read_csv(out / "results.csv").fillna({"linkage": "", "note": ""})
    key = ["seed", "method", "linkage", "keep_rate", "setting"]
    pd.testing.assert_series_equal(again.set_index(key).sort_index().top1, frame.set_index(key).sort_index().top1)


@pytest.mark.parametrize("flags, message", [
    (["--methods", "atc_ward"], "unknown method"),
    (["--keep_rates", "1.5"], "keep"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--threads", "-1"], "--threads"),
])
def test_bad_flags_fail_clearly(tmp_path, capsys, flags, message):
    job = _load()
    assert job.cli(["--output_dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_importing_atc_registers_the_models():
    code = "import atc, timm; print(len(timm.list_models('atc_*')), len(timm.list_models('tome_*')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["6", "6"]
