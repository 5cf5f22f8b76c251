# A baby GPT that trains on a laptop CPU in minutes (nanoGPT README's CPU settings).
out_dir = 'out-shakespeare-char-cpu'
init_from = 'scratch'
dataset = 'shakespeare_char'
always_save_checkpoint = False

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
block_size = 64

batch_size = 12
gradient_accumulation_steps = 1

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

eval_interval = 250
eval_iters = 20
log_interval = 10
