"""train_deit.py / validate_deit.py / train_mae.py end to end on tiny models and data, and their flag errors."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-kwargs", "embed_dim=32", "depth=4", "num_heads=2", "patch_size=8"]
FAST = ["--batch-size", "64", "--mixup", "0", "--cutmix", "0", "--num_workers", "0", "--no-progress",
        "--max-steps-per-epoch", "3", "--warmup-epochs", "1"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MODULES = {}


def _run(script, *args, env=None, subprocess_=False):
    """Run a script's CLI in this process (cheap: no re-import of torch/timm) or, with ``subprocess_``, as a
    separate ``python script.py`` process. Returns an object with returncode, stdout, stderr."""
    import contextlib
    import io
    import types

    argv = [str(a) for a in args]
    if subprocess_:
        full_env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT), **(env or {}))
        return subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True,
                              env=full_env)
    name = script[:-3]
    if name not in _MODULES:
        _MODULES[name] = _load(name)
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _MODULES[name].cli(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _has_reduction_models():
    try:
        import atc.models  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("model", ["deit_tiny_patch16_224", "atc_tiny_patch16_224"])
def test_train_resume_validate(tmp_path, model):
    """The issue's command: train 2 epochs, continue to 3 with --resume, validate the checkpoint."""
    if model.startswith("atc_") and not _has_reduction_models():
        pytest.skip("atc.models (registered reduction models) not available")
    out = tmp_path / "D"
    base = ["--dataset", "digits", "--model", model, *TINY[:1], "embed_dim=32", "depth=10", "num_heads=2",
            "--input-size", "32", "--reduction_loc", "3", "6", "9", "--keep_rate", "0.7", *FAST, "--output_dir", out]
    # the real command line once (for one of the two models: the other runs the same main in-process)
    first = _run("train_deit.py", *base, "--epochs", "2", subprocess_=model.startswith("atc_"))
    assert first.returncode == 0, first.stderr[-2000:]
    # no --linkage / --proportional_attn given: the run records what the model uses (the published defaults)
    recorded = json.loads((out / "args.json").read_text())
    assert (recorded["linkage"], recorded["proportional_attn"]) == (
        ("complete", True) if model.startswith("atc_") else (None, None))
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1
    second = _run("train_deit.py", *base, "--epochs", "3", "--resume", out / "checkpoint.pth")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "continuing at epoch 2" in second.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["num_updates"] == 9
    assert len((out / "log.csv").read_text().splitlines()) == 4
    best = torch.load(out / "best_checkpoint.pth", weights_only=False)
    assert isinstance(best["ema_best"], bool)

    val = _run("validate_deit.py", "--dataset", "digits", "--checkpoint", out / "checkpoint.pth", "--input-size", 32,
               "--num_workers", 0)
    assert val.returncode == 0, val.stderr[-2000:]
    report = json.loads(next(out.glob("validate_checkpoint_*.json")).read_text())
    assert len(report["predictions"]) == len(report["targets"]) == 360
    top1 = 100 * sum(p == t for p, t in zip(report["predictions"], report["targets"])) / 360
    assert report["top1"] == pytest.approx(top1) == pytest.approx(rows[-1]["val_top1"])
    assert all(t in top5 for t, top5 in zip(report["targets"], report["top5_predictions"])) == (report["top5"] == 100)
    n_params = sum(v.numel() for k, v in torch.load(out / "checkpoint.pth", weights_only=False)["model"].items())
    assert report["num_params"] == n_params


@pytest.mark.skipif(not _has_reduction_models(), reason="atc.models not available")
def test_validate_ots_keep_rate_one_equals_plain_model(tmp_path):
    """--ots rebuilds the model with other reduction flags; at keep rate 1 it must equal the unreduced model."""
    out = tmp_path / "D"
    res = _run("train_deit.py", "--dataset", "digits", "--model", "deit_tiny_patch16_224", *TINY, "--input-size", 32,
               *FAST, "--epochs", 1, "--output_dir", out)
    assert res.returncode == 0, res.stderr[-2000:]
    plain = _run("validate_deit.py", "--dataset", "digits", "--checkpoint", out / "checkpoint.pth", "--num_workers", 0)
    ots = _run("validate_deit.py", "--dataset", "digits", "--checkpoint", out / "checkpoint.pth", "--num_workers", 0,
               "--ots", "--model", "atc_tiny_patch16_224", "--keep_rate", "1.0", "--reduction_loc", "1", "3")
    assert plain.returncode == ots.returncode == 0, ots.stderr[-2000:]
    a = json.loads(next(out.glob("validate_checkpoint_deit*.json")).read_text())
    b = json.loads(next(out.glob("validate_checkpoint_atc*.json")).read_text())
    assert b["ots"] and b["model"] == "atc_tiny_patch16_224" and b["keep_rate"] == [1.0]
    assert a["predictions"] == b["predictions"]


@pytest.mark.parametrize("flags, message", [
    (["--keep_rate", "0"], "outside (0, 1]"),
    (["--reduction_ratio", "1.5"], "outside (0, 1]"),
    (["--model", "atc_tiny_patch16_224", "--reduction_loc", "3", "12"], "reduction location 12"),
    (["--model", "atc_tiny_patch16_224", "--model-kwargs", "depth=4", "--reduction_loc", "4"], "reduction location 4"),
    (["--model", "no_such_model"], "unknown model"),
    (["--dataset", "cifar"], "unknown dataset"),
    (["--linkage", "ward"], "unknown linkage"),
    (["--dataset", "coco", "--data", "/nonexistent", "--mixup", "0.8"], "multi-label"),
    (["--dataset", "imagenet", "--data", "/nonexistent", "--model", "deit_tiny_patch16_224"], "/nonexistent/val"),
    (["--distillation-type", "hard"], "--teacher-path"),
])
def test_bad_flags_fail_early_with_clear_errors(flags, message, capsys):
    train_deit = _load("train_deit")
    args = ["--dataset", "digits", "--num_workers", "0", *flags]
    assert train_deit.cli(args) == 2
    assert message in capsys.readouterr().err


def test_wandb_project_without_the_wandb_package_is_a_clear_error(tmp_path, monkeypatch):
    """--wandb_project when wandb is not installed: one error line naming the install command, before any work.
    (Logging itself is tested in test_wandb.py.)"""
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to importlib
    args = ["--dataset", "digits", "--num_workers", 0, "--wandb_project", "atc-test", "--output_dir", tmp_path / "W"]
    for script in ("train_deit.py", "train_mae.py"):
        res = _run(script, *args, env={"WANDB_MODE": "offline"})
        assert res.returncode == 2 and "pip install" in res.stderr and "wandb" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "W").exists()


def test_multilabel_training_reports_map(tmp_path):
    root = tmp_path / "nus"
    labels = ["['sky']", "['water', 'sky']", "['water']", "['tree']"]
    rows = [(f"img{i}.png", labels[i % 4], "train" if i < 12 else "val") for i in range(16)]
    with open(root.mkdir() or root / "nus_wid_data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    for i, (name, _, _) in enumerate(rows):
        Image.new("RGB", (12, 12), (40 * (i % 4), 255 - 40 * (i % 4), 90)).save(root / name)
    res = _run("train_deit.py", "--dataset", "nuswide", "--data", root, "--model", "deit_tiny_patch16_224", *TINY,
               "--input-size", 16, "--batch-size", 4, "--num_workers", 0, "--no-progress", "--epochs", 2,
               "--warmup-epochs", 0, "--no-repeated-aug", "--no-model-ema", "--output_dir", tmp_path / "ML")
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((tmp_path / "ML" / "log.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["val_mAP"] <= 100 and "val_top1" not in row


def test_grad_accum_lr_scaling_and_distillation(tmp_path):
    """--grad_accum_steps with --lr_batch_normalizer scaling, hard distillation from a local teacher file."""
    import timm

    teacher = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, embed_dim=32,
                                depth=1, num_heads=2, patch_size=8)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    res = _run("train_deit.py", "--dataset", "digits", "--model", "deit_tiny_patch16_224", *TINY, "--input-size", 16,
               *FAST, "--epochs", 1, "--warmup-epochs", 0, "--sched", "step", "--lr", 0.001, "--batch-size", 32,
               "--grad_accum_steps", 2, "--lr_batch_normalizer", 256, "--distillation-type", "hard",
               "--teacher-model", "deit_tiny_patch16_224", "--teacher-path", tmp_path / "teacher.pth",
               "--teacher-model-kwargs", "embed_dim=32", "depth=1", "num_heads=2", "patch_size=8", "--no-model-ema",
               "--output_dir", tmp_path / "A")
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((tmp_path / "A" / "log.jsonl").read_text().splitlines()[-1])
    assert row["lr"] == pytest.approx(0.001 * 32 * 2 / 256)
    assert row["num_updates"] == 1  # 3 batches, accumulation 2 -> one update, the incomplete pair dropped
    bad = _run("train_deit.py", "--dataset", "digits", "--model", "deit_tiny_patch16_224", *TINY, "--input-size", 16,
               *FAST, "--epochs", 1, "--distillation-type", "soft", "--teacher-model", "deit_tiny_patch16_224",
               "--teacher-path", tmp_path / "missing.pth")
    assert bad.returncode == 2 and "missing.pth" in bad.stderr


def test_train_mae_with_layer_decay(tmp_path):
    res = _run("train_mae.py", "--dataset", "digits", "--model", "vit_tiny_patch16_224", *TINY, "--input_size", 16,
               "--batch_size", 64, "--num_workers", 0, "--epochs", 1, "--warmup_epochs", 0, "--no-progress",
               "--layer_decay", 0.5, "--blr", 1e-3, "--output_dir", tmp_path / "M")
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(tmp_path / "M" / "checkpoint.pth", weights_only=False)
    scales = sorted({g.get("lr_scale", 1.0) for g in ckpt["optimizer"]["param_groups"]})
    # depth 4 + embeddings + head = 6 layer ids: scales 0.5^5 ... 0.5^0
    assert scales == pytest.approx([0.5 ** k for k in range(5, -1, -1)])


@pytest.mark.parametrize("merge_fn, sched, expected", [
    ("atc", "constant", [17 - 3 * (i + 1) for i in range(4)]),
    ("tome", "decrease", [17 - 6, 17 - 6 - 4, 17 - 6 - 4 - 2, 17 - 6 - 4 - 2]),
])
def test_mae_model_merges_exactly_r_tokens_per_block(merge_fn, sched, expected):
    """--r-count/--r-sched/--merge_fn: exactly r tokens removed per block (checked block by
    block: removing fewer than asked would silently change the experiment), MAE global
    pooling (fc_norm, no second final norm), and the r=0 model equals the unpatched timm model."""
    import argparse

    import timm

    train_mae = _load("train_mae")
    args = train_mae.get_args_parser().parse_args(
        ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=4", "num_heads=2",
         "patch_size=8", "--input_size", "32", "--drop_path", "0", "--r-count", "3", "--r-sched", sched,
         "--merge_fn", merge_fn, "--linkage", "single"])
    torch.manual_seed(0)
    model = train_mae.build_mae_model(args, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5)
    assert model._atc_info["tokens"] == expected
    assert isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    args.r_count = 0
    torch.manual_seed(0)
    plain_args = argparse.Namespace(**vars(args))
    unreduced = train_mae.build_mae_model(plain_args, num_classes=5).eval()
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, global_pool="avg",
                                  embed_dim=32, depth=4, num_heads=2, patch_size=8).eval()
    with torch.no_grad():
        assert torch.allclose(unreduced(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--model", "atc_small_patch16_224", "--epochs", "-3"], "--epochs -3: the number of training epochs must be >= 1"),
    (["--epochs", "0"], "--epochs 0"),
    (["--batch-size", "0"], "--batch-size 0: must be"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1: must be"),
    (["--decay-epochs", "0"], "--decay-epochs 0.0: must be"),
    (["--lr", "-0.1"], "--lr -0.1: must be"),
    (["--drop-path", "1.5"], "--drop-path 1.5: must be"),
    (["--clip-grad", "0"], "--clip-grad 0.0: must be"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch 0: must be"),
])
def test_bad_numbers_name_the_flag(flags, message, capsys):
    """Numeric flags that cannot work fail before anything is built, naming the flag and the valid range
    (``--epochs -3`` used to stop inside timm's scheduler with ``error: --sched cosine: `` and no reason)."""
    train_deit = _load("train_deit")
    assert train_deit.cli(["--dataset", "digits", "--num_workers", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip() != "error: --sched cosine:"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-3"], "--epochs -3"),
    (["--epochs", "2", "--warmup_epochs", "2"], "--warmup_epochs 2: must be in [0, --epochs)"),
    (["--batch_size", "0"], "--batch_size 0"),
])
def test_train_mae_bad_numbers_name_the_flag(flags, message, capsys):
    train_mae = _load("train_mae")
    assert train_mae.cli(["--dataset", "digits", "--num_workers", "0", *flags]) == 2
    assert message in capsys.readouterr().err
