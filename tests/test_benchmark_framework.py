"""benchmark_atc_framework.py end to end on tiny settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmark_atc_framework as bench  # noqa: E402


def test_all_frameworks_agree_and_write_outputs(tmp_path):
    rows = bench.main(["--framework", "all", "--input_sizes", "64", "96", "--batch_sizes", "0", "2",
                       "--runs", "3", "--emb_size", "8", "--linkage", "single", "average",
                       "--output_dir", str(tmp_path)])
    frame = pd.read_csv(tmp_path / "atc_framework_benchmark.csv")
    assert len(frame) == len(rows) == 2 * 2 * 2 * len(bench.parse_args([]).frameworks)
    assert set(frame["n_patches"]) == {16, 36}
    assert set(frame["batch_size"]) == {1, 4}
    assert (frame["num_clusters"] == frame["n_patches"] // 2).all()
    assert (frame["agreement_with_sklearn"] == 1.0).all()
    assert (frame["throughput"] > 0).all()
    sk = frame[frame["framework"] == "sklearn"]
    assert (sk["speedup_vs_sklearn"] == 1.0).all()
    assert (tmp_path / "atc_framework_benchmark_single.png").stat().st_size > 0
    assert (tmp_path / "atc_framework_benchmark_average.png").stat().st_size > 0


def test_rapids_alias_and_amp(tmp_path):
    args = bench.parse_args(["--framework", "numba", "scipy", "--use_amp"])
    assert args.frameworks == ["numba", "scipy"] and args.use_amp
    rows = bench.main(["--framework", "torch", "--input_sizes", "32", "--batch_sizes", "1", "--runs", "2",
                       "--use_amp", "--output_dir", str(tmp_path)])
    assert rows[0]["agreement_with_sklearn"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--reduction_ratio", "0"], "--reduction_ratio must be in"),
    (["--reduction_ratio", "1.5"], "--reduction_ratio must be in"),
    (["--framework", "magic"], "unknown --framework"),
    (["--linkage", "ward"], "invalid choice"),
    (["--input_sizes", "100"], "multiples of --patch_size"),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--throw_out", "1"], "--throw_out must be in"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "benchmark_atc_framework.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--framework", "--input_sizes", "--emb_size", "--runs", "--throw_out", "--batch_sizes",
                 "--reduction_ratio", "--linkage", "--use_amp", "--output_dir", "--device"):
        assert flag in out
