# Pretrain GPT-2 124M from scratch on OpenWebText on one GPU
# (prepare it with: python data/prepare.py --input=path/to/openwebtext/ --name=openwebtext).
out_dir = 'out-gpt2-124m'
init_from = 'scratch'
dataset = 'openwebtext'
always_save_checkpoint = False

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
block_size = 1024

# 4 x 12 sequences of 1024 tokens = 49,152 tokens per iteration
batch_size = 4
gradient_accumulation_steps = 12

learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5

eval_interval = 1000
eval_iters = 200
log_interval = 10
