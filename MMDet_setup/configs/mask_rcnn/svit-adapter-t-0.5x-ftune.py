# SViT dynamic token pruning baseline on ViT-Adapter-T (0.5x fine-tune): selectors on blocks 3-11 with keep
# targets .7/.7/.7/.49/.49/.49/.343/.343/.343 (keep_ratio**stage) and ratio loss weight 4.
_base_ = ['./_base_/mask_rcnn_vit_adapter.py', './_base_/coco_instance.py', './_base_/schedule_0.5x.py',
          './_base_/adamw.py', './_base_/default_runtime.py']
model = dict(backbone=dict(type='SViTAdapter', keep_ratio=0.7, prune_start=3, ratio_loss_weight=4.0,
                           reduction_ratio=None))
optimizer = dict(lr=0.00001, weight_decay=0.000001)
data = dict(samples_per_gpu=4, workers_per_gpu=2)
load_from = 'pretrained/vit-adapter-t-3x.pth'
work_dir = 'work_dirs/svit-adapter-t-0.5x-ftune'
