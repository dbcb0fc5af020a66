# Token-reduced fine-tune of the trained ViT-Adapter-T (0.5x = 6 epochs, AdamW lr 1e-5, weight decay 1e-6).
# Reduction at blocks 3/6/9 keeping reduction_ratio of the current tokens; linkage tome | single | complete |
# average. Published example: --cfg-options model.backbone.linkage=single model.backbone.reduction_ratio=0.25
# cumulative_iters=2 data.samples_per_gpu=8 work_dir=...
_base_ = ['./_base_/mask_rcnn_vit_adapter.py', './_base_/coco_instance.py', './_base_/schedule_0.5x.py',
          './_base_/adamw.py', './_base_/default_runtime.py']
model = dict(backbone=dict(reduction_ratio=0.7, linkage='average', reduction_loc=[3, 6, 9], proportional_attn=True))
optimizer = dict(lr=0.00001, weight_decay=0.000001)
data = dict(samples_per_gpu=4, workers_per_gpu=2)
load_from = 'pretrained/vit-adapter-t-3x.pth'  # e.g. work_dirs/vit-adapter-t-3x/latest.pth copied there
work_dir = 'work_dirs/tomeatc-adapter-t-0.5x-ftune'
