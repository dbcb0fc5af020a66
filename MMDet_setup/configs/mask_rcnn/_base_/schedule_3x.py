# 3x schedule (36 epochs), AdamW 1e-4, steps at 27/33 (as the published ViT-Adapter Mask R-CNN 3x configs).
optimizer = dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05)
optimizer_config = dict(grad_clip=None)
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[27, 33])
runner = dict(type='EpochBasedRunner', max_epochs=36)
