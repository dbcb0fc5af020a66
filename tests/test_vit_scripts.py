"""The ViT scripts end to end on tiny settings: each once as a subprocess, as users run them; their error paths
in-process (the same ``main``, without another interpreter start-up)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _fails(script: str, argv: list[str], capsys) -> str:
    """Run ``script``'s ``main(argv)`` in-process, expecting it to stop with an error; returns what the user would
    read on stderr (argparse's message, or the ``sys.exit("error: ...")`` text Python prints)."""
    spec = importlib.util.spec_from_file_location(f"vit_script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    code = exc.value.code
    assert code not in (0, None)
    return capsys.readouterr().err + (code if isinstance(code, str) else "")


def test_benchmark_script(tmp_path, capsys):
    _run("benchmark_merging_method.py", "--model", "atc_tiny_patch16_224", "tome_tiny_patch16_224",
         "--reduction_ratio", "0.7", "0.5", "--input_size", "64", "--runs", "2", "--batch_sizes", "1",
         "--output_dir", str(tmp_path))
    df = pd.read_csv(tmp_path / "throughput.csv")
    assert list(df.columns[:5]) == ["batch_size", "throughput", "reduction_ratio", "model", "input_size"]
    assert set(df.model) == {"deit_tiny_patch16_224", "deit_tiny_patch16_224+patch(r=0)",
                             "atc_tiny_patch16_224", "tome_tiny_patch16_224"}
    assert len(df) == 2 + 2 * 2 and (df.batch_size == 2).all() and (df.throughput > 0).all()
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert "keep rate in (0, 1]" in _fails("benchmark_merging_method.py", ["--reduction_ratio", "1.5"], capsys)


def test_ots_script_on_digits(tmp_path, capsys):
    _run("validate_ots_sslbackbone.py", "--dataset", "digits", "--model-type", "mae", "--model-name",
         "vit_tiny_patch16_224", "--input-size", "32", "--r", "0", "1", "0", "--merge_fn", "atc", "tome",
         "--linkage", "complete", "-b", "32", "--max-samples", "64", "--results-dir", str(tmp_path))
    df = pd.read_csv(tmp_path / "mae_vit_tiny_patch16_224_32.csv")
    assert {"Model", "Img_Size", "r", "Top-1", "Top-5", "Param"} <= set(df.columns)
    assert len(df) == 6
    for fn, group in df.groupby("Merge_fn"):
        # r=0 after r=1 really resets r (published defect 9): same accuracy and token count as the first r=0
        assert group.iloc[0]["Top-1"] == group.iloc[2]["Top-1"] and group.iloc[0]["Tokens"] == group.iloc[2]["Tokens"]
        assert group.iloc[1]["Tokens"] < group.iloc[0]["Tokens"]
    assert (tmp_path / "mae_vit_tiny_patch16_224_32.png").exists()
    missing = _fails("validate_ots_sslbackbone.py", ["--dataset", "imagenet", "--data", str(tmp_path / "nope"),
                                                      "--r", "0"], capsys)
    assert "nope" in missing and "Traceback" not in missing


def test_ots_script_checkpoint_errors_are_clear(tmp_path, capsys):
    """A corrupt --checkpoint and one of another architecture each give one clear error, not a traceback."""
    import timm
    import torch

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=64, depth=2,
                                           num_heads=2, num_classes=10).state_dict()}, other)
    common = ["--dataset", "digits", "--model-type", "mae", "--model-name", "vit_tiny_patch16_224",
              "--input-size", "32", "--r", "0", "--max-samples", "8", "--results-dir", str(tmp_path)]
    for path, message in ((corrupt, "cannot read"), (other, "does not fit this model")):
        bad = _fails("validate_ots_sslbackbone.py", [*common, "--checkpoint", str(path)], capsys)
        assert message in bad and str(path) in bad and "Traceback" not in bad


def test_visualize_script(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "merges.png"
    _run("visualize_merging.py", "--image", str(img), "--model", "vit_tiny_patch16_224", "--input-size", "64",
         "--r", "2", "--merge_fn", "atc", "tome", "--linkage", "average", "single", "--output", str(out))
    assert Image.open(out).size[0] > Image.open(out).size[1] * 3  # input + 3 panels side by side
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    bad = _fails("visualize_merging.py", ["--image", str(corrupt), "--model", "vit_tiny_patch16_224", "--output",
                                          str(out)], capsys)
    assert "corrupt.jpg" in bad and "Traceback" not in bad
