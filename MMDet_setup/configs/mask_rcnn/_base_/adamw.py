# AdamW as published: no weight decay on the level/position embeddings, norms and biases.
optimizer = dict(
    type='AdamW', lr=0.0001, weight_decay=0.05,
    paramwise_cfg=dict(custom_keys={
        'level_embed': dict(decay_mult=0.),
        'pos_embed': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'bias': dict(decay_mult=0.)}))
optimizer_config = dict(grad_clip=None)
