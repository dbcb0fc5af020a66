_base_ = ['./vit-adapter-t-3x.py']
# Token-reduced fine-tune (0.5x = 6 epochs, lr 1e-5) from the trained 3x model.
# linkage: tome | single | complete | average; reduction_ratio = keep fraction at blocks 3/6/9.
model = dict(backbone=dict(reduction_ratio=0.7, linkage='average', reduction_loc=[3, 6, 9], proportional_attn=True))
optimizer = dict(lr=0.00001)
lr_config = dict(warmup_iters=0, warmup=None, step=[5])
runner = dict(max_epochs=6)
load_from = 'work_dirs/vit-adapter-t-3x/latest.pth'
work_dir = 'work_dirs/tomeatc-adapter-t-0.5x-ftune'
