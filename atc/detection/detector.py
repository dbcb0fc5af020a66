"""Mask R-CNN + FPN (torchvision) around the ViT-Adapter backbone, built from an mmdet-style config dict."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from atc.detection.svit import SViTAdapter
from atc.detection.vit_adapter import ViTAdapter, vit_adapter_small, vit_adapter_tiny

__all__ = ["BACKBONES", "build_backbone", "BackboneWithFPN", "build_detector"]

BACKBONES = {"ViTAdapter": ViTAdapter, "ViTAdapterT": vit_adapter_tiny, "ViTAdapterS": vit_adapter_small,
             "SViTAdapter": SViTAdapter}


def build_backbone(cfg: Mapping[str, Any], load_pretrained: bool = False) -> ViTAdapter:
    """Backbone from ``dict(type=..., **kwargs)``; ``pretrained`` (a local DeiT checkpoint) is only loaded with
    ``load_pretrained`` (training from scratch), as mmdet only uses it when initialising weights.

    The published keys of the keep rate (``reduction_ratio``, SViT's ``keep_ratio``) pass through to the
    backbone, which maps them to ``keep_rate`` (:func:`atc.detection.vit_adapter.resolve_keep_rate`): mapping
    there rather than here also covers mmdet's registry, which builds the backbone classes directly."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "ViTAdapter")
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone type {kind!r}: choose one of {sorted(BACKBONES)}")
    pretrained = cfg.pop("pretrained", None)
    return BACKBONES[kind](**cfg, pretrained=pretrained if load_pretrained else None)


class BackboneWithFPN(nn.Module):
    """ViT-Adapter pyramid (strides 4-32) -> FPN (+ max-pool level, stride 64); ``out_channels`` for torchvision."""

    def __init__(self, backbone: ViTAdapter, out_channels: int = 256) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork([backbone.embed_dim] * 4, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class DetectorWithAux(MaskRCNN):
    """torchvision Mask R-CNN that adds the backbone's auxiliary loss (SViT ratio loss) in training."""

    def forward(self, images, targets=None):  # type: ignore[override]
        out = super().forward(images, targets)
        if self.training:
            extra = self.backbone.body.extra_loss()
            if extra is not None:
                out["loss_svit_ratio"] = extra
        return out


def build_detector(model_cfg: Mapping[str, Any], load_pretrained: bool = False) -> MaskRCNN:
    """Build from ``model = dict(backbone=dict(...), neck=dict(out_channels), num_classes, min_size, max_size,
    anchor_sizes, representation_size, mask_dim, detector=dict(**torchvision MaskRCNN kwargs))``.

    ``num_classes`` excludes background (mmdet convention; torchvision's +1 is added here). ``min_size`` may be
    a list: training picks one at random per batch (multi-scale), evaluation uses the last.
    """
    cfg = dict(model_cfg)
    unknown = set(cfg) - {"type", "backbone", "neck", "num_classes", "min_size", "max_size", "anchor_sizes",
                          "representation_size", "mask_dim", "detector"}
    if unknown:
        raise ValueError(f"unknown model keys {sorted(unknown)} (this engine builds torchvision's Mask R-CNN; "
                         f"see docs/detection.md for the supported keys)")
    if cfg.get("type", "MaskRCNN") != "MaskRCNN":
        raise ValueError(f"model.type {cfg['type']!r} is not supported: only MaskRCNN")
    backbone = BackboneWithFPN(build_backbone(cfg["backbone"], load_pretrained),
                               int(cfg.get("neck", {}).get("out_channels", 256)))
    ch = backbone.out_channels
    sizes = tuple((int(s),) for s in cfg.get("anchor_sizes", (32, 64, 128, 256, 512)))
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs 5 values (one per FPN level), got {len(sizes)}")
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    rep, mask_dim = int(cfg.get("representation_size", 1024)), int(cfg.get("mask_dim", 256))
    ncls = int(cfg["num_classes"]) + 1
    names = ["0", "1", "2", "3"]
    min_size = cfg.get("min_size", 800)
    min_size = tuple(int(v) for v in min_size) if isinstance(min_size, (list, tuple)) else int(min_size)
    return DetectorWithAux(
        backbone, num_classes=None, min_size=min_size, max_size=int(cfg.get("max_size", 1333)),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2), box_head=TwoMLPHead(ch * 49, rep),
        box_predictor=FastRCNNPredictor(rep, ncls),
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), mask_head=MaskRCNNHeads(ch, (mask_dim,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, ncls),
        **dict(cfg.get("detector", {})),
    )
