# 0.33x: 4 epochs, lr x0.1 at epoch 3 (the published token-reduced fine-tunes of the S models).
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[3])
runner = dict(type='EpochBasedRunner', max_epochs=4)
