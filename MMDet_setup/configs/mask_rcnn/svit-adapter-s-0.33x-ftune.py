_base_ = ['./vit-adapter-s-3x.py']
model = dict(backbone=dict(type='SViTAdapter', keep_ratio=0.7, prune_start=3, reduction_ratio=None))
optimizer = dict(lr=0.00001)
lr_config = dict(warmup_iters=0, warmup=None, step=[3])
runner = dict(max_epochs=4)
load_from = 'work_dirs/vit-adapter-s-3x/latest.pth'
work_dir = 'work_dirs/svit-adapter-s-0.33x-ftune'
