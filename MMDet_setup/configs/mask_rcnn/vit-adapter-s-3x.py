_base_ = ['./vit-adapter-t-3x.py']
model = dict(backbone=dict(embed_dim=384, num_heads=6, deform_num_heads=6))
work_dir = 'work_dirs/vit-adapter-s-3x'
