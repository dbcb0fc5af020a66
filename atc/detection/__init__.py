"""Dense prediction: ViT-Adapter backbone with token reduction (ATC / ToMe) and the SViT baseline, in a
torchvision Mask R-CNN + FPN, trained and evaluated from mmdet-style configs (``MMDet_setup/``).

Where mmdet with compiled mmcv ops is installed, importing this package also registers ``ViTAdapter``,
``SViTAdapter``, ``ViTAdapterT`` and ``ViTAdapterS`` in mmdet's ``MODELS`` registry, so they can be dropped into
mmdet configs (``backbone=dict(type='ViTAdapter', reduction_ratio=0.7, linkage='average', ...)``). mmdet's
necks expect a tuple of feature maps, which the backbone returns as a list of 4 levels (strides 4-32). That path
is not tested here (mmcv's ops do not build on the project's machines).
"""

from __future__ import annotations

from atc.detection.svit import SViTAdapter
from atc.detection.vit_adapter import ViTAdapter, vit_adapter_small, vit_adapter_tiny

__all__ = ["ViTAdapter", "SViTAdapter", "vit_adapter_tiny", "vit_adapter_small", "register_with_mmdet"]


def register_with_mmdet() -> bool:
    """Register the backbones with mmdet's model registry (mmdet 3.x ``mmdet.registry.MODELS``, else mmdet 2.x
    ``mmdet.models.builder.BACKBONES``); returns False when mmdet cannot be imported. Untested against a real
    mmdet here (its compiled mmcv ops do not build on the project's machines)."""
    registry = None
    try:
        from mmdet.registry import MODELS as registry  # type: ignore[import-not-found]  # noqa: N811
    except Exception:  # noqa: BLE001 - mmdet missing, 2.x, or its compiled mmcv ops broken
        try:
            from mmdet.models.builder import BACKBONES as registry  # type: ignore[import-not-found]  # noqa: N811
        except Exception:  # noqa: BLE001
            return False
    for name, obj in (("ViTAdapter", ViTAdapter), ("SViTAdapter", SViTAdapter), ("ViTAdapterT", vit_adapter_tiny),
                      ("ViTAdapterS", vit_adapter_small)):
        if registry.get(name) is None:
            registry.register_module(name=name, module=obj)
    return True


register_with_mmdet()
