"""Losses timm does not provide: ASL's asymmetric loss (multi-label) and DeiT's distillation wrapper.

Cross-entropy variants (``SoftTargetCrossEntropy`` for mixup, ``LabelSmoothingCrossEntropy``) come from timm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AsymmetricLoss", "DistillationLoss"]


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021; ASL defaults).

    ``loss = -sum( y * (1-p)^g+ * log p  +  (1-y) * p_m^g- * log(1-p_m) )`` with ``p = sigmoid(logits)`` and the
    shifted negative probability ``p_m = max(p - clip, 0)``. Summed over the batch and classes, like ASL.

    Args: logits ``(B, K)``, targets ``(B, K)`` multi-hot. Returns a scalar.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                 disable_torch_grad_focal_loss: bool = True) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.disable_torch_grad_focal_loss = disable_torch_grad_focal_loss

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        targets = targets.float()
        p = torch.sigmoid(logits)
        p_neg = 1 - p  # probability of "absent"
        if self.clip and self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1)  # 1 - max(p - clip, 0)
        loss = targets * torch.log(p.clamp(min=self.eps)) + (1 - targets) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            # ASL computes the focusing weight without gradient (its default), which we follow.
            with torch.set_grad_enabled(not self.disable_torch_grad_focal_loss):
                pt = p * targets + p_neg * (1 - targets)
                gamma = self.gamma_pos * targets + self.gamma_neg * (1 - targets)
                weight = torch.pow(1 - pt, gamma)
            loss = loss * weight
        return -loss.sum()


class DistillationLoss(nn.Module):
    """DeiT's distillation: ``(1-alpha) * base(student, y) + alpha * kd(student_dist, teacher(x))``.

    The student may return ``(cls_logits, dist_logits)`` (a distilled model in training) or plain logits, which
    then serve both roles. ``soft``: KL divergence at temperature ``tau`` (scaled by tau^2, averaged over
    samples); ``hard``: cross-entropy with the teacher's argmax. ``none`` returns the base loss.
    """

    def __init__(self, base_criterion: nn.Module, teacher: nn.Module | None, distillation_type: str = "none",
                 alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"distillation_type must be none|soft|hard, got {distillation_type!r}")
        if distillation_type != "none" and teacher is None:
            raise ValueError("distillation needs a teacher model (--teacher-model and --teacher-path)")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: Tensor, outputs: Tensor | tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        outputs_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            outputs_kd = outputs
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == "soft":
            t = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / t, dim=1), F.log_softmax(teacher_outputs / t, dim=1),
                reduction="sum", log_target=True) * (t * t) / outputs_kd.shape[0]
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha
