"""Nothing lost: SIGKILL a training run mid-epoch, rerun the same command, and end with exactly the metrics and
weights of an uninterrupted run (deterministic mode, augmentation, mixup, drop path and EMA all on)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cmd(out):
    return [sys.executable, str(ROOT / "train_deit.py"), "--dataset", "digits", "--model", "deit_tiny_patch16_224",
            "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "patch_size=8", "--input-size", "48",
            "--batch-size", "32", "--epochs", "3", "--warmup-epochs", "1", "--sched_in_steps", "--num_workers", "0",
            "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--model-ema-decay", "0.9",
            "--deterministic", "--no-progress", "--output_dir", str(out)]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _rows(out):
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.timeout(180)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    reference = subprocess.Popen(_cmd(tmp_path / "ref"), env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_cmd(tmp_path / "killed"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _rows(tmp_path / "killed") and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # well inside epoch 1 (an epoch takes seconds)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert len(_rows(tmp_path / "killed")) == 1, "the kill should land in epoch 1"
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0  # the last finished epoch survived intact

    resumed = subprocess.run(_cmd(tmp_path / "killed"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert reference.wait() == 0, reference.stderr.read()[-2000:]

    ref_rows, got_rows = _rows(tmp_path / "ref"), _rows(tmp_path / "killed")
    assert [r["epoch"] for r in got_rows] == [0, 1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "ema_loss", "lr", "num_updates"):
        assert got_rows[-1][key] == ref_rows[-1][key], key
    a = torch.load(tmp_path / "ref" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
