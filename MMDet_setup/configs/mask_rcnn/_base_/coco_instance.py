# COCO 2017 instances. Paths are relative to data_root, so `--cfg-options data_root=/my/coco/` moves every split.
data_root = 'data/coco/'
data = dict(
    samples_per_gpu=2, workers_per_gpu=2,
    train=dict(ann_file='annotations/instances_train2017.json', img_prefix='train2017/', flip_prob=0.5),
    val=dict(ann_file='annotations/instances_val2017.json', img_prefix='val2017/'),
    test=dict(ann_file='annotations/instances_val2017.json', img_prefix='val2017/'),
)
evaluation = dict(interval=1, metric=['bbox', 'segm'])
