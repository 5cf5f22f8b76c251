# nanoGPT's baby GPT on tiny Shakespeare characters (python data/shakespeare_char/prepare.py).
out_dir = 'out-shakespeare-char'
init_from = 'scratch'
dataset = 'shakespeare_char'
always_save_checkpoint = False

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
block_size = 256  # context of up to 256 previous characters

batch_size = 64
gradient_accumulation_steps = 1

learning_rate = 1e-3  # a small network can take a high learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # a bit larger because there are few tokens per iteration
warmup_iters = 100

eval_interval = 250
eval_iters = 200
log_interval = 10
