checkpoint_config = dict(interval=1, max_keep_ckpts=3, save_last=True)
log_config = dict(interval=50)
work_dir = 'work_dirs/mask_rcnn'
load_from = None
resume_from = None
auto_resume = True   # rerunning with the same work_dir continues from work_dir/latest.pth
cumulative_iters = 1  # gradient accumulation: optimiser step every N batches
fp16 = dict(loss_scale=dict(init_scale=512))  # published AMP setting: fp16 + loss scaling on GPU, bf16 on CPU
seed = 0
device = 'auto'
