"""benchmark_atc_framework.py end to end on tiny settings."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_atc_framework", ROOT / "benchmark_atc_framework.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_all_frameworks_agree_and_write_outputs(tmp_path):
    rows = bench.main(["--framework", "all", "--input_sizes", "64", "96", "--batch_sizes", "0", "2",
                       "--runs", "3", "--repeats", "1", "--emb_size", "8", "--linkage", "single", "average",
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
    (["--tokens", "16", "--input_sizes", "64"], "not allowed with argument"),
    (["--batches", "4", "--batch_sizes", "2"], "not allowed with argument"),
    (["--batches", "0"], "--batches are numbers of samples"),
    (["--batch_sizes", "64"], "use --batches for plain numbers"),
    (["--tokens", "0"], "--tokens are token counts"),
    (["--check_samples", "0"], "--check_samples: expected 'auto', 'all' or a positive number"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "benchmark_atc_framework.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--framework", "--input_sizes", "--emb_size", "--runs", "--throw_out", "--batch_sizes",
                 "--reduction_ratio", "--linkage", "--use_amp", "--output_dir", "--device", "--tokens", "--batches",
                 "--check_samples", "--max_seconds", "--repeats", "--no_check", "--seed", "--patch_size"):
        assert flag in out


def test_tokens_and_plain_batches(tmp_path):
    rows = bench.main(["--framework", "numba", "torch", "--tokens", "16", "50", "--batches", "1", "3", "--runs", "2",
                       "--repeats", "1", "--emb_size", "8", "--output_dir", str(tmp_path)])
    frame = pd.read_csv(tmp_path / "atc_framework_benchmark.csv")
    assert len(frame) == len(rows) == 2 * 2 * 2
    assert set(frame["n_patches"]) == {16, 50} and set(frame["batch_size"]) == {1, 3}
    assert (frame["num_clusters"] == frame["n_patches"] // 2).all()
    # 16 tokens is a 64px image; 50 tokens is no square image
    assert set(frame.loc[frame["n_patches"] == 16, "input_size"]) == {64}
    assert frame.loc[frame["n_patches"] == 50, "input_size"].isna().all()
    assert (frame["agreement_with_sklearn"] == 1.0).all() and (frame["agreement_with_numba"] == 1.0).all()
    assert (frame["sklearn_checked_samples"] == frame["batch_size"]).all()
    assert (frame["device"] == "cpu").all() and (frame["dtype"] == "float32").all() and frame["error"].isna().all()
    assert list(frame.columns[:11]) == ["framework", "linkage", "input_size", "n_patches", "emb_size", "num_clusters",
                                        "batch_size", "runs_timed", "rounds", "throughput", "agreement_with_sklearn"]


def test_check_only_first_samples_at_large_sizes(tmp_path, monkeypatch, capsys):
    rows = bench.main(["--framework", "torch", "--tokens", "36", "--batches", "5", "--runs", "1", "--repeats", "1",
                       "--check_samples", "2", "--output_dir", str(tmp_path)])
    assert rows[0]["sklearn_checked_samples"] == 2 and rows[0]["agreement_with_sklearn"] == 1.0
    assert math.isnan(rows[0]["agreement_with_numba"])  # numba did not run
    assert "100% (2/5)" in capsys.readouterr().out
    # auto: as many samples as fit in the budget of distance entries, at least one
    monkeypatch.setattr(bench, "CHECK_BUDGET", 3 * 36 * 36)
    rows = bench.main(["--framework", "numba", "--tokens", "36", "64", "--batches", "8", "--runs", "1",
                       "--repeats", "1", "--output_dir", str(tmp_path)])
    assert [r["sklearn_checked_samples"] for r in rows] == [3, 1]
    assert all(r["agreement_with_sklearn"] == 1.0 and r["agreement_with_numba"] == 1.0 for r in rows)
    rows = bench.main(["--framework", "numba", "--tokens", "36", "--batches", "8", "--runs", "1", "--repeats", "1",
                       "--no_check", "--output_dir", str(tmp_path)])
    assert rows[0]["sklearn_checked_samples"] == 0 and math.isnan(rows[0]["agreement_with_sklearn"])


def test_a_failing_backend_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    real = bench.agglomerative_clustering

    def flaky(metric, k, linkage, backend):
        if backend == "scipy":
            raise RuntimeError("out of memory (simulated)")
        return real(metric, k, linkage, backend)

    monkeypatch.setattr(bench, "agglomerative_clustering", flaky)
    rows = bench.main(["--framework", "scipy", "numba", "--tokens", "16", "--batches", "2", "--runs", "2",
                       "--repeats", "1", "--output_dir", str(tmp_path)])
    by = {r["framework"]: r for r in rows}
    assert "out of memory (simulated)" in by["scipy"]["error"] and math.isnan(by["scipy"]["throughput"])
    assert by["numba"]["error"] == "" and by["numba"]["throughput"] > 0 and by["numba"]["agreement_with_sklearn"] == 1
    assert "some settings failed" in capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "atc_framework_benchmark.csv")
    assert len(frame) == 2


def test_timing_waits_for_the_device(monkeypatch, tmp_path):
    """On CUDA the clustering call is asynchronous: every timed span must end with a synchronize."""
    calls = []
    monkeypatch.setattr(bench, "synchronize", lambda device: calls.append(("sync", str(device))))
    real = bench.agglomerative_clustering
    monkeypatch.setattr(bench, "agglomerative_clustering",
                        lambda *a, **k: calls.append(("call",)) or real(*a, **k))
    bench.main(["--framework", "numba", "--tokens", "16", "--batches", "2", "--runs", "2", "--repeats", "1",
                "--no_check", "--output_dir", str(tmp_path)])
    # label call, then the time estimate bracketed by synchronizes
    assert calls[:4] == [("call",), ("sync", "cpu"), ("call",), ("sync", "cpu")]


def _triton_listed(env: dict) -> bool:
    probe = subprocess.run([sys.executable, "-c", "from atc.cluster import available_backends as a; "
                            "print('triton' in a())"], cwd=ROOT, env=env, capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def test_triton_framework_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if not _triton_listed(env):
        pytest.skip("no triton clustering backend here (not in available_backends() under TRITON_INTERPRET=1)")
    proc = subprocess.run([sys.executable, "benchmark_atc_framework.py", "--framework", "triton", "numba",
                           "--tokens", "16", "24", "--batches", "1", "3", "--runs", "1", "--repeats", "1",
                           "--output_dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "atc_framework_benchmark.csv")
    triton = frame[frame["framework"] == "triton"]
    assert len(triton) == 4 and (triton["agreement_with_numba"] == 1.0).all()
    assert (triton["agreement_with_sklearn"] == 1.0).all()
