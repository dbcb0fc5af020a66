_base_ = ['./vit-adapter-t-3x.py']
# SViT dynamic-pruning baseline: keep targets keep_ratio**stage on blocks 3-11 (.7/.49/.343).
model = dict(backbone=dict(type='SViTAdapter', keep_ratio=0.7, prune_start=3, reduction_ratio=None))
optimizer = dict(lr=0.00001)
lr_config = dict(warmup_iters=0, warmup=None, step=[5])
runner = dict(max_epochs=6)
load_from = 'work_dirs/vit-adapter-t-3x/latest.pth'
work_dir = 'work_dirs/svit-adapter-t-0.5x-ftune'
