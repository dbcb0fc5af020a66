"""Weights & Biases tracking for real (atc.tracking through train_deit.py, train_mae.py and the detection trainer):
offline runs are read back from their files and compared with the CSV/JSONL logs written next to them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_scripts import FAST, ROOT, TINY, _run

wandb = pytest.importorskip("wandb")

ATC = ["--dataset", "digits", "--model", "atc_tiny_patch16_224", *TINY, "--input-size", "32", "--reduction_loc", "1",
       "2", "--keep_rate", "0.7", "--linkage", "complete", "--proportional_attn", "--seed", "3", *FAST]
# cheaper runs where only the tracking behaviour matters
PLAIN = ["--dataset", "digits", "--model", "deit_tiny_patch16_224", *TINY, "--input-size", "16", "--no-model-ema",
         *FAST]


@pytest.fixture
def wandb_env(tmp_path):
    """Offline and quiet, with every folder wandb writes to inside tmp_path."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}


def _runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


def _read_run(run_dir: Path) -> dict:
    """An offline run as wandb itself reads it back. wandb 0.31 writes no ``files/wandb-summary.json`` or
    ``files/config.yaml`` offline: everything is in the ``run-<id>.wandb`` transaction log, which the installed
    wandb decodes with ``wandb leet inspect --json`` (one JSON record per line; no network)."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)], cwd=run_dir,
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    config = dict(run.get("config", {}).get("update", {}))
    summary: dict = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"].get("update", {}))
        elif r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    exit_code = next((r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"), None)
    return {"run": run, "config": config, "summary": summary, "history": history, "exit_code": exit_code}


def _log_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_offline_run_holds_config_metrics_and_best_and_resume_continues_it(tmp_path, wandb_env):
    """The issue's check: train on digits with --wandb_project, read the offline run back, compare it with
    log.jsonl; then --resume with more epochs continues the same W&B run (same id, next epoch as its step)."""
    out, wb = tmp_path / "D", Path(wandb_env["WANDB_DIR"])
    flags = [*ATC, "--wandb_project", "atc-test", "--wandb_group", "table-1", "--wandb_name", "atc-complete-0.7",
             "--output_dir", out]
    first = _run("train_deit.py", *flags, "--epochs", 1, env=wandb_env)
    assert first.returncode == 0, first.stderr[-2000:]
    [run_dir] = _runs(wb)
    run = _read_run(run_dir)
    run_id = run["run"]["run_id"]
    assert run["run"]["project"] == "atc-test" and run["run"]["run_group"] == "table-1"
    assert run["run"]["display_name"] == "atc-complete-0.7" and run["exit_code"] == 0
    config = run["config"]
    assert {k: config[k] for k in ("model", "method", "linkage", "keep_rate", "reduction_loc", "proportional_attn",
                                   "seed", "dataset", "epochs")} == {
        "model": "atc_tiny_patch16_224", "method": "atc", "linkage": "complete", "keep_rate": 0.7,
        "reduction_loc": [1, 2], "proportional_attn": True, "seed": 3, "dataset": "digits", "epochs": 1}
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert config["num_params"] == sum(v.numel() for v in ckpt["model"].values())
    # 32 px, patch 8: 16 patches + CLS; 16 * 0.7 -> 11 after block 1, 16 * 0.49 -> 7 after block 2
    assert config["tokens_per_block"] == [17, 12, 8, 8] and config["gflops_per_image"] > 0

    [row] = _log_rows(out)
    [logged] = run["history"]
    assert logged["_step"] == logged["epoch"] == 0
    for column, key in (("val_top1", "val/top1"), ("val_top5", "val/top5"), ("val_loss", "val/loss"),
                        ("train_loss", "train/loss"), ("lr", "train/lr"), ("ema_top1", "ema/top1"),
                        ("train_images_per_s", "train/images_per_s")):
        assert logged[key] == pytest.approx(row[column]), key
    assert row["train_images_per_s"] > 0
    best_is_ema = row["ema_top1"] > row["val_top1"]
    best = "ema" if best_is_ema else "val"
    assert run["summary"]["best/epoch"] == 0 and run["summary"]["best/ema"] == best_is_ema
    for metric in ("top1", "top5", "loss"):
        assert run["summary"][f"best/{metric}"] == pytest.approx(row[f"{best}_{metric}"])
    assert ckpt["wandb_run_id"] == run_id
    assert json.loads((out / "wandb_run.json").read_text())["run_id"] == run_id

    second = _run("train_deit.py", *flags, "--epochs", 2, "--resume", out / "checkpoint.pth", env=wandb_env)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = _runs(wb)
    assert len(runs) == 2  # the continuation's offline segment: same run id, synced into the same W&B run
    resumed = _read_run(runs[1])
    assert resumed["run"]["run_id"] == run_id and resumed["run"]["resume"] is True
    rows = _log_rows(out)
    assert [h["epoch"] for h in resumed["history"]] == [h["_step"] for h in resumed["history"]] == [1]
    assert [h["val/top1"] for h in resumed["history"]] == pytest.approx([r["val_top1"] for r in rows[1:]])
    best_row = max(rows, key=lambda r: max(r["val_top1"], r["ema_top1"]))
    assert resumed["summary"]["best/metric"] == pytest.approx(max(best_row["val_top1"], best_row["ema_top1"]))
    assert resumed["summary"]["best/epoch"] == best_row["epoch"]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["wandb_run_id"] == run_id


def test_run_killed_in_its_first_epoch_is_continued_not_duplicated(tmp_path, wandb_env, monkeypatch):
    """No checkpoint yet, nothing logged: the rerun continues the W&B run recorded in the output folder. Once an
    epoch was logged, starting over without resuming (--no-auto-resume) is a new run."""
    from atc.tracking import EpochLogger

    for key, value in wandb_env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "K"
    killed = EpochLogger(out, wandb_project="atc-test")  # started, then "killed" before logging an epoch
    run_id = killed.wandb_run_id
    killed.finish(exit_code=1)
    with EpochLogger(out, wandb_project="atc-test") as again:
        assert again.wandb_run_id == run_id
        again.log({"epoch": 0, "train_loss": 1.0})
    with EpochLogger(out, wandb_project="atc-test") as fresh:
        assert fresh.wandb_run_id not in (None, run_id)


def test_failing_init_is_reported_once_and_training_completes(tmp_path, wandb_env):
    res = _run("train_deit.py", *PLAIN, "--epochs", 2, "--wandb_project", "bad/name", "--output_dir", tmp_path / "B",
               env=wandb_env)
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "bad/name" in warnings[0] and "log.csv" in warnings[0]
    assert [r["epoch"] for r in _log_rows(tmp_path / "B")] == [0, 1]
    assert not _runs(Path(wandb_env["WANDB_DIR"]))


def test_failing_log_is_reported_once_and_training_completes(tmp_path, wandb_env, monkeypatch):
    """wandb failing mid-run (here: every log call raises 'no space left on device')."""
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", full_disk)
    res = _run("train_deit.py", *PLAIN, "--epochs", 2, "--wandb_project", "atc-test", "--output_dir", tmp_path / "F",
               env=wandb_env)
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert [r["epoch"] for r in _log_rows(tmp_path / "F")] == [0, 1]
    [run_dir] = _runs(Path(wandb_env["WANDB_DIR"]))
    assert _read_run(run_dir)["exit_code"] == 1  # the run is closed as failed, not left open


def test_train_mae_logs_to_the_output_folder_by_default(tmp_path, wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    env = {k: v for k, v in wandb_env.items() if k != "WANDB_DIR"}
    out = tmp_path / "M"
    # 16 px, patch 8, 3 blocks: 4 patch tokens, ToMe removes 1 per block
    res = _run("train_mae.py", "--dataset", "digits", "--model", "vit_tiny_patch16_224", "--model-kwargs",
               "embed_dim=32", "depth=3", "num_heads=2", "patch_size=8", "--input_size", 16, "--batch_size", 256,
               "--num_workers", 0, "--epochs", 1, "--warmup_epochs", 0, "--no-progress", "--r-count", 1,
               "--merge_fn", "tome", "--wandb_project", "atc-mae", "--output_dir", out, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    [run_dir] = _runs(out)
    run = _read_run(run_dir)
    assert run["run"]["display_name"] == "M"  # default name: the output folder's
    assert run["config"]["method"] == "tome" and run["config"]["r_count"] == 1
    assert run["config"]["tokens_per_block"] == [4, 3, 2]  # 4 patches + CLS, one fewer after each block
    [row] = _log_rows(out)
    assert run["history"][0]["val/top1"] == pytest.approx(row["val_top1"])
    assert run["summary"]["best/top1"] == pytest.approx(row["val_top1"])


def test_detection_training_logs_and_resumes_the_same_run(tmp_path, wandb_env, monkeypatch):
    from _det_data import TINY_OPTIONS, make_coco

    coco = tmp_path / "coco"
    make_coco(coco, num_images=2, size=64, seed=0)  # one batch per epoch: only the logging matters here
    spec = importlib.util.spec_from_file_location("train_mmdet", ROOT / "MMDet_setup" / "train_mmdet.py")
    train_mmdet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_mmdet)
    for key, value in wandb_env.items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "work"
    config = ROOT / "MMDet_setup" / "configs" / "mask_rcnn" / "tomeatc-adapter-t-0.5x-ftune.py"
    argv = [str(config), "--work-dir", str(work), "--wandb_project", "atc-det", "--cfg-options", *TINY_OPTIONS,
            f"data_root={coco}/", "evaluation.metric=[bbox]", "data.samples_per_gpu=2",
            "model.backbone.linkage=single", "model.backbone.reduction_ratio=0.5"]
    assert train_mmdet.main([*argv, "runner.max_epochs=1"]) == 0
    assert train_mmdet.main([*argv, "runner.max_epochs=2"]) == 0
    first, second = (_read_run(d) for d in _runs(Path(wandb_env["WANDB_DIR"])))
    assert first["run"]["run_id"] == second["run"]["run_id"]
    assert {k: first["config"][k] for k in ("method", "linkage", "keep_rate", "backbone")} == {
        "method": "atc", "linkage": "single", "keep_rate": 0.5, "backbone": "ViTAdapter"}
    rows = _log_rows(work)
    assert [h["epoch"] for h in first["history"] + second["history"]] == [0, 1]
    assert second["history"][0]["bbox_mAP"] == pytest.approx(rows[1]["bbox_mAP"])
    assert second["history"][0]["train/loss"] == pytest.approx(rows[1]["train_loss"])


def test_only_the_main_process_logs(tmp_path, wandb_env, monkeypatch):
    from atc import distributed as D
    from atc.tracking import WandbRun

    for key, value in wandb_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(D, "get_rank", lambda: 1)
    run = WandbRun("atc-test", folder=tmp_path / "R")
    assert not run.active and run.id is None
    run.log({"epoch": 0, "val_top1": 1.0}, step=0)
    run.finish()
    assert not (tmp_path / "R").exists() and not Path(wandb_env["WANDB_DIR"]).exists()


def test_history_keys():
    from atc.tracking import history_key

    assert [history_key(k) for k in ("val_top1", "ema_mAP", "train_loss", "lr", "best_metric", "epoch",
                                     "bbox_mAP", "epoch_time")] == [
        "val/top1", "ema/mAP", "train/loss", "train/lr", "best/metric", "epoch", "bbox_mAP", "epoch_time"]


def test_no_flag_or_wandb_disabled_never_imports_wandb_nor_creates_a_run(tmp_path):
    """atc, the engine and a whole training without --wandb_project, or with it under WANDB_MODE=disabled, never
    import wandb and leave no run behind. (timm itself tries ``import wandb`` when it is imported, so that
    import is undone before the check.)"""
    code = f"""
import importlib.util, os, sys
import timm
for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
    del sys.modules[name]
import atc, atc.engine, atc.tracking
spec = importlib.util.spec_from_file_location("train_deit", "train_deit.py")
train_deit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_deit)
base = {[str(a) for a in [*PLAIN, "--epochs", 1]]!r}
assert train_deit.cli([*base, "--output_dir", {str(tmp_path / "L")!r}]) == 0
os.environ["WANDB_MODE"] = "disabled"
assert train_deit.cli([*base, "--wandb_project", "atc-test", "--output_dir", {str(tmp_path / "O")!r}]) == 0
assert "wandb" not in sys.modules, "wandb was imported"
"""
    wandb_dir = tmp_path / "wandb_dir"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", WANDB_DIR=str(wandb_dir)))
    assert res.returncode == 0, res.stderr[-2000:]
    for out in (tmp_path / "L", tmp_path / "O"):
        assert len(_log_rows(out)) == 1
        assert not (out / "wandb").exists() and not (out / "wandb_run.json").exists()
        assert torch.load(out / "checkpoint.pth", weights_only=False)["wandb_run_id"] is None
    assert not wandb_dir.exists()
