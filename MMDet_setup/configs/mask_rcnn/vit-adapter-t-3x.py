_base_ = ['./_base_/mask_rcnn_vit_adapter.py', './_base_/coco_instance.py', './_base_/schedule_3x.py',
          './_base_/default_runtime.py']
# Baseline ViT-Adapter-T, no token reduction. Backbone init: a local DeiT-T checkpoint via load_from.
work_dir = 'work_dirs/vit-adapter-t-3x'
