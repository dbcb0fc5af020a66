# Mask R-CNN + FPN with the ViT-Adapter-T backbone, as the published vit-adapter-t-3x (SViT repository, itself
# ViT-Adapter's mask_rcnn_deit_adapter_tiny_fpn_3x_coco). Built with torchvision's Mask R-CNN (docs/detection.md):
# mmdet's `neck=dict(type='FPN', in_channels=[192]*4, out_channels=256, num_outs=5)` is the torchvision FPN with a
# max-pool 5th level; anchors 32..512 with ratios 0.5/1/2 per level; RoIAlign 7x7 (box) and 14x14 (mask).
model = dict(
    type='MaskRCNN',
    backbone=dict(
        type='ViTAdapter', patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, drop_path_rate=0.1,
        layer_scale=False, conv_inplane=64, n_points=4, deform_num_heads=6, cffn_ratio=0.25, deform_ratio=1.0,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]], window_attn=[False] * 12, window_size=[None] * 12,
        pretrained=None,
        # token reduction: keep fraction of the current tokens at each of reduction_loc (None = no reduction);
        # method: atc | tome (atc.merge.MERGE_METHODS); linkage (ATC): single | complete | average. The published
        # linkage='tome' is still accepted and means method='tome'.
        reduction_ratio=None, linkage='average', reduction_loc=[3, 6, 9], proportional_attn=True,
        norm='bn'),
    neck=dict(out_channels=256),
    num_classes=80,
    # Multi-scale training (short side picked per image), 800 at test, long side <= 1333 (mmdet's img_scale).
    min_size=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], max_size=1333,
    anchor_sizes=[32, 64, 128, 256, 512],
    representation_size=1024, mask_dim=256,
    detector=dict(box_detections_per_img=100, box_score_thresh=0.05, box_nms_thresh=0.5,
                  rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
                  rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000),
)
