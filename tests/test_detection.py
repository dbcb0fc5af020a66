"""Dense prediction: ViT-Adapter with token reduction, deformable attention, Mask R-CNN training/evaluation
through MMDet_setup/, the backbone benchmark, and clear errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from _det_data import TINY_OPTIONS, make_coco
from atc.detection.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from atc.detection.svit import SViTAdapter
from atc.detection.vit_adapter import ViTAdapter, planned_token_counts

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "MMDet_setup" / "configs" / "mask_rcnn"
TINY_BACKBONE = dict(embed_dim=48, num_heads=3, deform_num_heads=3, conv_inplane=8, norm="gn", drop_path_rate=0.0)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "MMDet_setup" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "MMDet_setup"))
    spec.loader.exec_module(module)
    return module


def _backbone(**kw) -> ViTAdapter:
    torch.manual_seed(0)
    model = ViTAdapter(**TINY_BACKBONE, **kw).eval()
    with torch.no_grad():  # zero-initialised parts (level embed aside) would hide mistakes: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=16)
    return root


def _options(coco: Path, *extra: str) -> list[str]:
    return [*TINY_OPTIONS, f"data_root={coco}/", "evaluation.metric=[bbox,segm]", *extra]


# -------------------------------------------------------------------------------------------------- backbone
def test_keep_fraction_one_equals_unreduced_backbone():
    image = torch.rand(2, 3, 96, 128)
    plain = _backbone(reduction_ratio=None)
    for linkage in ("average", "single", "complete", "tome"):
        reduced = _backbone(reduction_ratio=1.0, linkage=linkage)
        reduced.load_state_dict(plain.state_dict())
        with torch.no_grad():
            want, got = plain(image), reduced(image)
        assert reduced.last_token_counts == [48, 48, 48]
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("linkage, keep", [("average", 0.7), ("single", 0.5), ("complete", 0.25), ("tome", 0.7)])
def test_reduction_counts_and_full_grid_outputs(linkage, keep):
    image = torch.rand(2, 3, 128, 128)
    model = _backbone(reduction_ratio=keep, linkage=linkage)
    plain = _backbone(reduction_ratio=None)
    with torch.no_grad():
        feats, ref = model(image), plain(image)
    assert model.last_token_counts == planned_token_counts(64, keep, 3)
    assert [f.shape for f in feats] == [(2, 48, 32, 32), (2, 48, 16, 16), (2, 48, 8, 8), (2, 48, 4, 4)]
    assert all(torch.isfinite(f).all() for f in feats)
    # reduction changes the features (the merged path is really taken), but not beyond recognition
    assert not torch.allclose(feats[2], ref[2])


def test_svit_prunes_towards_its_targets_and_keeps_the_grid():
    torch.manual_seed(0)
    model = SViTAdapter(**TINY_BACKBONE, keep_ratio=0.7)
    image = torch.rand(2, 3, 64, 64)
    model.train()
    feats = model(image)
    loss = model.extra_loss()
    assert loss is not None and loss.requires_grad and float(loss) >= 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[3].selector.parameters())
    model.eval()
    with torch.no_grad():
        feats = model(image)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert model.extra_loss() is None
    assert [round(model.blocks[i].target_keep, 3) for i in (3, 6, 9)] == [0.7, 0.49, 0.343]


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="unknown linkage"):
        ViTAdapter(**TINY_BACKBONE, reduction_ratio=0.7, linkage="ward")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ViTAdapter(**TINY_BACKBONE, reduction_ratio=0.0)
    with pytest.raises(ValueError, match="at most half"):
        ViTAdapter(**TINY_BACKBONE, reduction_ratio=0.3, linkage="tome")
    with pytest.raises(ValueError, match="divisible by 32"):
        _backbone()(torch.rand(1, 3, 72, 64))


# ------------------------------------------------------------------------------------- deformable attention
def _bilinear_zero_pad(v: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value (D,) of map v (D, H, W) at normalised (x, y), pixel centres at (i + 0.5) / size, zeros outside."""
    _, h, w = v.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(v.shape[0], dtype=v.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < h and 0 <= xx < w:
                out += v[:, yy, xx] * (1 - abs(px - xx)) * (1 - abs(py - yy))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ms_deform_attn_core_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (3, 4)]
    bsz, heads, dim, lq, points = 2, 2, 3, 4, 3
    value = torch.randn(bsz, sum(h * w for h, w in shapes), heads, dim, generator=g, dtype=torch.float64)
    loc = torch.rand(bsz, lq, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(bsz, lq, heads, len(shapes), points, generator=g, dtype=torch.float64)
    got = ms_deform_attn_core(value, shapes, loc, weights)
    want = torch.zeros(bsz, lq, heads, dim, dtype=torch.float64)
    levels = value.split([h * w for h, w in shapes], dim=1)
    for b in range(bsz):
        for q in range(lq):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    vmap = levels[lvl][b, :, m].T.reshape(dim, h, w)
                    for p in range(points):
                        x, y = loc[b, q, m, lvl, p].tolist()
                        want[b, q, m] += weights[b, q, m, lvl, p] * _bilinear_zero_pad(vmap, x, y)
    torch.testing.assert_close(got, want.reshape(bsz, lq, heads * dim))


def test_ms_deform_attn_module_shapes_and_errors():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    out = attn(torch.randn(1, 6, 16), torch.rand(1, 6, 2, 2), torch.randn(1, 20, 16), shapes)
    assert out.shape == (1, 6, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(torch.randn(1, 6, 16), torch.rand(1, 6, 2, 2), torch.randn(1, 19, 16), shapes)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=3)


# ------------------------------------------------------------------------------------------- training / eval
def test_short_training_with_atc_improves_bbox_ap(coco, tmp_path):
    from atc.detection.engine import build_dataset, build_model, evaluate, train

    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    options = parser.parse_args(["--cfg-options", *_options(
        coco, "optimizer.lr=0.002", "runner.max_epochs=12", "lr_config.step=[100]", "evaluation.interval=100",
        "evaluation.metric=[bbox]", "model.backbone.linkage=average", "model.backbone.reduction_ratio=0.7")]).cfg_options
    cfg = _script("train_mmdet").load_config(str(CONFIGS / "tomeatc-adapter-t-0.5x-ftune.py"), options,
                                             str(tmp_path / "work"))
    torch.manual_seed(0)
    untrained = evaluate(build_model(cfg), build_dataset(cfg, "val"), torch.device("cpu"), metrics=("bbox",))
    trained = train(cfg)
    assert trained["bbox_mAP"] > untrained["bbox_mAP"] + 0.05, (untrained, trained)
    assert trained["bbox_mAP_50"] > 0.2
    ckpt = torch.load(tmp_path / "work" / "latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 12


def test_train_mmdet_published_options_resume_and_evaluate(coco, tmp_path, capsys):
    train_mmdet, test_mmdet = _script("train_mmdet"), _script("test_mmdet")
    config = str(CONFIGS / "tomeatc-adapter-t-0.5x-ftune.py")
    work = tmp_path / "work"
    published = ["model.backbone.linkage=single", "model.backbone.reduction_ratio=0.25", "cumulative_iters=2"]
    argv = [config, "--work-dir", str(work), "--launcher", "none", "--cfg-options", *_options(coco, *published)]
    assert train_mmdet.main([*argv, "runner.max_epochs=1"]) == 0
    assert torch.load(work / "latest.pth", map_location="cpu", weights_only=False)["epoch"] == 1
    first = torch.load(work / "latest.pth", map_location="cpu", weights_only=False)["model"]
    # rerunning with a longer schedule resumes from work_dir/latest.pth instead of starting over
    assert train_mmdet.main([*argv, "runner.max_epochs=2"]) == 0
    ckpt = torch.load(work / "latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2
    assert any(not torch.equal(first[k], ckpt["model"][k]) for k in first)
    with open(work / "log.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]

    out = tmp_path / "metrics.json"
    assert test_mmdet.main([config, str(work / "latest.pth"), "--out", str(out), "--cfg-options",
                            *_options(coco, *published)]) == 0
    metrics = json.loads(out.read_text())
    assert {"bbox_mAP", "segm_mAP"} <= set(metrics) and all(0 <= v <= 1 for v in metrics.values())
    assert metrics["bbox_mAP"] == pytest.approx(ckpt["metrics"]["bbox_mAP"])


@pytest.mark.parametrize("extra, message", [
    (["model.backbone.linkage=ward"], "unknown linkage"),
    (["model.backbone.reduction_ratio=1.5"], "(0, 1]"),
    (["cumulative_iters=0"], "cumulative_iters"),
    (["data_root=/nonexistent/coco/"], "does not exist"),
])
def test_train_mmdet_bad_options_are_clear_errors(coco, tmp_path, capsys, extra, message):
    train_mmdet = _script("train_mmdet")
    rc = train_mmdet.main([str(CONFIGS / "tomeatc-adapter-t-0.5x-ftune.py"), "--work-dir", str(tmp_path),
                           "--cfg-options", *_options(coco, *extra)])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_config_and_foreign_checkpoint(coco, tmp_path, capsys):
    train_mmdet, test_mmdet = _script("train_mmdet"), _script("test_mmdet")
    assert train_mmdet.main([str(CONFIGS / "no-such-config.py")]) == 2
    assert "not found" in capsys.readouterr().err
    from atc.detection.detector import build_detector

    foreign = build_detector({"backbone": {**TINY_BACKBONE, "embed_dim": 96}, "num_classes": 2,
                              "neck": {"out_channels": 32}, "representation_size": 64, "mask_dim": 16})
    path = tmp_path / "foreign.pth"
    torch.save({"model": foreign.state_dict()}, path)
    rc = test_mmdet.main([str(CONFIGS / "vit-adapter-t-3x.py"), str(path), "--cfg-options", *_options(coco)])
    assert rc == 2
    assert "does not fit" in capsys.readouterr().err


def test_configs_mirror_the_published_ones():
    from mmengine.config import Config

    ft = Config.fromfile(str(CONFIGS / "tomeatc-adapter-t-0.5x-ftune.py"))
    base = Config.fromfile(str(CONFIGS / "vit-adapter-t-3x.py"))
    small = Config.fromfile(str(CONFIGS / "tomeatc-adapter-s-0.33x-ftune.py"))
    assert base.model.backbone.interaction_indexes == [[0, 2], [3, 5], [6, 8], [9, 11]]
    assert base.model.backbone.reduction_ratio is None and base.runner.max_epochs == 36
    assert ft.model.backbone.reduction_loc == [3, 6, 9] and ft.model.backbone.reduction_ratio == 0.7
    assert ft.optimizer.type == "AdamW" and ft.load_from.endswith("latest.pth")
    assert small.model.backbone.embed_dim == 384
    svit = Config.fromfile(str(CONFIGS / "svit-adapter-t-0.5x-ftune.py"))
    assert svit.model.backbone.type == "SViTAdapter"


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_backbone_writes_csv(tmp_path):
    bench = _script("benchmark_backbone")
    rows = bench.main(["--input-size", "64", "--methods", "none", "average", "tome", "--runs", "1", "--repeats", "1",
                       "--warmup", "0", "--output_dir", str(tmp_path),
                       "--cfg-options", *[o for o in TINY_OPTIONS if o.startswith("model.")]])
    with open(tmp_path / "detection_throughput.csv") as fh:
        saved = list(csv.DictReader(fh))
    assert len(saved) == len(rows) == 6
    assert {r["part"] for r in saved} == {"backbone", "detector"}
    none = [r for r in saved if r["method"] == "none"]
    assert all(float(r["speedup_vs_none"]) == 1.0 for r in none)
    atc_row = next(r for r in saved if r["method"] == "average" and r["part"] == "backbone")
    assert atc_row["tokens_after_locs"] == "/".join(map(str, planned_token_counts(16, 0.7, 3)))
    assert all(float(r["img_per_s"]) > 0 for r in saved)


def test_load_from_a_deit_checkpoint_initialises_the_vit(tmp_path):
    import timm

    from atc.detection.detector import build_detector
    from atc.detection.engine import load_weights

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, embed_dim=48, num_heads=3)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    detector = build_detector({"backbone": TINY_BACKBONE, "num_classes": 2, "neck": {"out_channels": 32},
                               "representation_size": 64, "mask_dim": 16})
    load_weights(detector, str(tmp_path / "deit.pth"))
    body = detector.backbone.body
    torch.testing.assert_close(body.blocks[7].attn.qkv.weight, deit.blocks[7].attn.qkv.weight)
    torch.testing.assert_close(body.patch_embed.weight, deit.patch_embed.proj.weight)
    torch.testing.assert_close(body.pos_embed, deit.pos_embed[:, 1:])  # class token dropped
