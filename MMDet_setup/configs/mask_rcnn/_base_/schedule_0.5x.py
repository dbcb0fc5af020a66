# 0.5x: 6 epochs, lr x0.1 at epoch 4 (the published token-reduced fine-tunes of the T models).
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[4])
runner = dict(type='EpochBasedRunner', max_epochs=6)
