# gpt2-medium on tiny Shakespeare, constant learning rate, 20 iterations.
out_dir = 'out-shakespeare-gpt2-medium'
init_from = 'gpt2-medium'
dataset = 'shakespeare'
always_save_checkpoint = False

# 2 x 16 sequences of 1024 tokens = 32,768 tokens per iteration
batch_size = 2
gradient_accumulation_steps = 16
max_iters = 20

learning_rate = 3e-5
decay_lr = False

eval_interval = 5
eval_iters = 40
log_interval = 1
