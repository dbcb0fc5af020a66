# SViT dynamic token pruning baseline on ViT-Adapter-S (0.33x fine-tune).
_base_ = ['./_base_/mask_rcnn_vit_adapter.py', './_base_/coco_instance.py', './_base_/schedule_0.33x.py',
          './_base_/adamw.py', './_base_/default_runtime.py']
model = dict(backbone=dict(type='SViTAdapter', embed_dim=384, num_heads=6, deform_num_heads=6, drop_path_rate=0.2,
                           keep_ratio=0.7, prune_start=3, ratio_loss_weight=4.0, reduction_ratio=None))
optimizer = dict(lr=0.00001, weight_decay=0.000001)
data = dict(samples_per_gpu=2, workers_per_gpu=1)
load_from = 'pretrained/vit-adapter-s-3x.pth'
work_dir = 'work_dirs/svit-adapter-s-0.33x-ftune'
