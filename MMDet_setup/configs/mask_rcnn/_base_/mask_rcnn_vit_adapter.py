# Mask R-CNN + FPN with the ViT-Adapter-T backbone (torchvision detector; see docs/detection.md).
model = dict(
    backbone=dict(type='ViTAdapter', embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, patch_size=16,
                  pretrain_size=224, drop_path_rate=0.1, conv_inplane=64, n_points=4, deform_num_heads=6,
                  deform_ratio=1.0, cffn_ratio=0.25, init_values=0.0,
                  interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
                  reduction_ratio=None, linkage='average', reduction_loc=[3, 6, 9], proportional_attn=True,
                  norm='bn'),
    neck=dict(out_channels=256),
    num_classes=80,
    min_size=800, max_size=1333,
    anchor_sizes=[32, 64, 128, 256, 512],
    representation_size=1024, mask_dim=256,
    detector=dict(box_detections_per_img=100),
)
