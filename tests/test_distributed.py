"""Two gloo processes on CPU (torchrun) train exactly like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "digits", "--model", "deit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2",
          "num_heads=2", "patch_size=8", "--input-size", "16", "--mixup", "0", "--cutmix", "0", "--no-aug",
          "--no-repeated-aug", "--drop-path", "0", "--smoothing", "0", "--no-model-ema", "--num_workers", "0",
          "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-3", "--unscale-lr", "--no-progress",
          "--max-steps-per-epoch", "6", "--dist-eval", "--deterministic"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.timeout(120)
def test_two_gloo_processes_match_single_process(tmp_path):
    single = subprocess.run([sys.executable, str(ROOT / "train_deit.py"), *COMMON, "--batch-size", "32",
                             "--output_dir", str(tmp_path / "one")], env=_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train_deit.py"), *COMMON, "--batch-size", "16",
                          "--output_dir", str(tmp_path / "two")], env=_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2" in two.stdout
    a = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=False)
    assert a["num_updates"] == b["num_updates"] == 6
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-5), key
    # --dist-eval gathers every shard: the same 360 validation images and metrics.
    row_a = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[-1])
    row_b = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[-1])
    assert row_a["val_n"] == row_b["val_n"] == 360
    assert abs(row_a["val_top1"] - row_b["val_top1"]) < 1e-6
    assert abs(row_a["train_loss"] - row_b["train_loss"]) < 1e-4
