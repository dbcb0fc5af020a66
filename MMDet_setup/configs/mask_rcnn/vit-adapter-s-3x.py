# ViT-Adapter-S + Mask R-CNN, 3x schedule, no token reduction.
_base_ = ['./_base_/mask_rcnn_vit_adapter.py', './_base_/coco_instance.py', './_base_/schedule_3x.py',
          './_base_/adamw.py', './_base_/default_runtime.py']
model = dict(backbone=dict(embed_dim=384, num_heads=6, deform_num_heads=6, drop_path_rate=0.2,
                           pretrained='pretrained/deit_small_patch16_224-cd65a155.pth'))
data = dict(samples_per_gpu=2, workers_per_gpu=1)
work_dir = 'work_dirs/vit-adapter-s-3x'
