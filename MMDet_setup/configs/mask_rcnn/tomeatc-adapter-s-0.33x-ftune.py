_base_ = ['./vit-adapter-s-3x.py']
# Token-reduced fine-tune (0.33x = 4 epochs, lr 1e-5) from the trained 3x model.
model = dict(backbone=dict(reduction_ratio=0.7, linkage='average', reduction_loc=[3, 6, 9], proportional_attn=True))
optimizer = dict(lr=0.00001)
lr_config = dict(warmup_iters=0, warmup=None, step=[3])
runner = dict(max_epochs=4)
load_from = 'work_dirs/vit-adapter-s-3x/latest.pth'
work_dir = 'work_dirs/tomeatc-adapter-s-0.33x-ftune'
