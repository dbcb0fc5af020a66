"""atc.engine / atc.losses against independent references: brute-force losses and metrics, accumulation
equivalence, exact resume, pos-embed interpolation."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from atc.checkpoint import load_checkpoint
from atc.cli import ConfigError
from atc.engine import FitConfig, evaluate, fit, mean_average_precision, train_one_epoch
from atc.models import build_classifier, validate_reduction
from atc.losses import AsymmetricLoss, DistillationLoss


def test_asymmetric_loss_matches_elementwise_formula():
    logits = torch.randn(5, 7)
    targets = (torch.rand(5, 7) > 0.6).float()
    got = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05)(logits, targets)
    total = 0.0
    for i in range(5):
        for k in range(7):
            p = 1 / (1 + math.exp(-logits[i, k].item()))
            if targets[i, k] == 1:
                total += (1 - p) ** 1 * math.log(max(p, 1e-8))
            else:
                pm = max(p - 0.05, 0.0)
                total += pm ** 4 * math.log(max(1 - pm, 1e-8))
    assert got.item() == pytest.approx(-total, rel=1e-5)


def _brute_ap(scores, labels):
    order = np.argsort(-scores, kind="stable")
    hits, precisions = 0, []
    for rank, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            precisions.append(hits / rank)
    return np.mean(precisions)


def test_map_matches_bruteforce_average_precision():
    rng = np.random.default_rng(0)
    scores = rng.random((40, 6))
    labels = (rng.random((40, 6)) > 0.7).astype(int)
    labels[:, 5] = 0  # a class without positives is ignored
    expected = np.mean([_brute_ap(scores[:, k], labels[:, k]) for k in range(5)]) * 100
    assert mean_average_precision(scores, labels) == pytest.approx(expected)


def test_distillation_loss_soft_and_hard():
    x = torch.randn(4, 3)
    teacher = nn.Linear(3, 5)
    student_out, dist_out = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    base = nn.CrossEntropyLoss()
    hard = DistillationLoss(base, teacher, "hard", alpha=0.3)(x, (student_out, dist_out), y)
    t_out = teacher(x).detach()
    ref_hard = 0.7 * F.cross_entropy(student_out, y) + 0.3 * F.cross_entropy(dist_out, t_out.argmax(1))
    assert hard.item() == pytest.approx(ref_hard.item(), rel=1e-6)
    tau = 2.0
    soft = DistillationLoss(base, teacher, "soft", alpha=0.5, tau=tau)(x, student_out, y)
    p_t = F.softmax(t_out / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(student_out / tau, 1))).sum(1).mean() * tau ** 2
    assert soft.item() == pytest.approx((0.5 * F.cross_entropy(student_out, y) + 0.5 * kl).item(), rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(base, None, "soft")


def test_evaluate_topk_matches_manual():
    logits = torch.randn(30, 8)
    targets = torch.randint(0, 8, (30,))

    class Fixed(nn.Module):
        def forward(self, idx):
            return logits[idx]

    loader = DataLoader(TensorDataset(torch.arange(30), targets), batch_size=7)
    res = evaluate(Fixed(), loader, torch.device("cpu"), progress=False)
    top1 = np.mean([logits[i].argmax().item() == targets[i].item() for i in range(30)]) * 100
    top5 = np.mean([targets[i].item() in logits[i].argsort(descending=True)[:5].tolist() for i in range(30)]) * 100
    assert res["top1"] == pytest.approx(top1) and res["top5"] == pytest.approx(top5)
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def _tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 3))


def test_gradient_accumulation_equals_large_batch():
    data = TensorDataset(torch.randn(64, 3, 2, 2), torch.randint(0, 3, (64,)))
    results = []
    for batch, accum in ((16, 1), (8, 2)):
        model = _tiny_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(data, batch_size=batch, shuffle=False)
        train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, torch.device("cpu"), 0, accum_steps=accum,
                        progress=False)
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_fit_resume_reproduces_uninterrupted_run(tmp_path):
    from timm.scheduler import create_scheduler_v2

    data = TensorDataset(torch.randn(48, 3, 2, 2), torch.randint(0, 3, (48,)))

    def run(out, epochs, resume=None):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.3), nn.Linear(16, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=3, warmup_epochs=1, step_on_epochs=False,
                                       updates_per_epoch=6)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=3)
        loader = DataLoader(data, batch_size=8, sampler=sampler)
        cfg = FitConfig(epochs=epochs, output_dir=str(out), sched_in_steps=True, progress=False)
        row = fit(cfg, model, loader, DataLoader(data, batch_size=16), nn.CrossEntropyLoss(), opt,
                  torch.device("cpu"), lr_scheduler=sched, resume_from=resume, log=lambda s: None)
        return row, model

    full_row, full = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    torch.manual_seed(123)  # a resumed process starts from a different RNG state: the checkpoint must fix it
    resumed_row, resumed = run(tmp_path / "b", 3, resume=tmp_path / "b" / "checkpoint.pth")
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_row["val_loss"] == full_row["val_loss"] and resumed_row["lr"] == full_row["lr"]
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert len(log) == 4 and (tmp_path / "b" / "best_checkpoint.pth").is_file()


def test_finetune_interpolates_position_embedding(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": src.state_dict()}, tmp_path / "src.pth")
    dst = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=48, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2)
    head = dst.head.weight.clone()
    load_checkpoint(dst, tmp_path / "src.pth", strict=False, drop_mismatched_head=True, antialias=False)
    assert torch.equal(dst.head.weight, head)  # a head of another size is dropped
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    assert torch.allclose(dst.pos_embed[:, 1:], ref, atol=1e-5)
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    wrong = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(ConfigError, match="does not fit"):
        load_checkpoint(wrong, tmp_path / "src.pth", strict=False, drop_mismatched_head=True)


def test_reduction_validation():
    for kr in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="outside"):
            validate_reduction(kr, [3], "average")
    with pytest.raises(ConfigError, match="linkage"):
        validate_reduction(0.5, [3], "ward")
    with pytest.raises(ConfigError, match="reduction location 4"):
        validate_reduction(0.5, [1, 4], "average", depth=4)
    validate_reduction(1.0, [0, 3], "single", depth=4)
    with pytest.raises(ConfigError, match="unknown model"):
        build_classifier("no_such_vit", 10, 32)
