# ViT-Adapter-T + Mask R-CNN, 3x schedule, no token reduction: the model the reduced variants fine-tune from.
_base_ = ['./_base_/mask_rcnn_vit_adapter.py', './_base_/coco_instance.py', './_base_/schedule_3x.py',
          './_base_/adamw.py', './_base_/default_runtime.py']
# Local DeiT-T ImageNet weights (deit_tiny_patch16_224-a1311bcf.pth from the DeiT release); nothing is downloaded.
model = dict(backbone=dict(pretrained='pretrained/deit_tiny_patch16_224-a1311bcf.pth'))
data = dict(samples_per_gpu=4, workers_per_gpu=2)
work_dir = 'work_dirs/vit-adapter-t-3x'
