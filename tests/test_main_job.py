"""The main job (reproduce_digits_table.py) end to end on a tiny configuration, its resume and its errors."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "8", "--lr", "3e-3", "--finetune-epochs", "1", "--keep_rates", "0.7", "0.25", "--methods", "none", "tome",
        "atc_average", "--embed-dim", "64", "--depth", "3", "--num-heads", "2", "--reduction_loc", "0", "1", "2",
        "--throughput-runs", "1", "--input-size", "32", "--patch-size", "4"]


def _load():
    spec = importlib.util.spec_from_file_location("reproduce_digits_table", ROOT / "reproduce_digits_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_end_to_end_and_rerun_skips_finished_rows(tmp_path, capsys):
    job = _load()
    out = tmp_path / "table"
    assert job.cli(["--output_dir", str(out), *TINY]) == 0
    frame = pd.read_csv(out / "results.csv")
    # no reduction once, ToMe and ATC at two keep rates, each off the shelf and fine-tuned
    assert len(frame) == 2 + 2 * 2 * 2
    assert set(frame.setting) == {"off-the-shelf", "fine-tuned"}
    base = frame[(frame.method == "none") & (frame.setting == "off-the-shelf")].top1.iloc[0]
    assert base > 50, f"the base ViT did not learn digits ({base}% top-1)"
    # 64 tokens at 32 px / patch 4: keep 0.7 -> int(64 * 0.7^i) = 44/31/21 tokens after the three locations
    atc_row = frame[(frame.method == "atc_average") & (frame.keep_rate == 0.7)].iloc[0]
    assert atc_row.tokens_after_locs == "44/31/21"
    # ToMe cannot remove more than half the tokens per location at keep 0.25: noted, not silently capped
    tome_row = frame[(frame.method == "tome") & (frame.keep_rate == 0.25)].iloc[0]
    assert "at most half" in tome_row.note
    md = (out / "results.md").read_text()
    assert "| atc average |" in md and "kr 0.25 FT" in md
    assert (out / "results.png").stat().st_size > 1000

    before = (out / "results.csv").read_text()
    capsys.readouterr()
    assert job.cli(["--output_dir", str(out), *TINY]) == 0
    assert (out / "results.csv").read_text() == before  # finished rows are skipped, not recomputed


@pytest.mark.parametrize("flags, message", [
    (["--methods", "atc_ward"], "unknown method"),
    (["--keep_rates", "1.5"], "keep"),
])
def test_bad_flags_fail_clearly(tmp_path, capsys, flags, message):
    job = _load()
    assert job.cli(["--output_dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_importing_atc_registers_the_models():
    code = "import atc, timm; print(len(timm.list_models('atc_*')), len(timm.list_models('tome_*')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["6", "6"]
