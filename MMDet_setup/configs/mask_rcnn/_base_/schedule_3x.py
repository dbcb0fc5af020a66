# 3x: 36 epochs, lr x0.1 at epochs 27 and 33, linear warm-up over 500 iterations.
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[27, 33])
runner = dict(type='EpochBasedRunner', max_epochs=36)
