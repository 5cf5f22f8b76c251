# nanoGPT's finetune_shakespeare: gpt2-xl on tiny Shakespeare, constant learning rate, 20 iterations.
out_dir = 'out-shakespeare'
init_from = 'gpt2-xl'
dataset = 'shakespeare'
always_save_checkpoint = False

# 1 x 32 sequences of 1024 tokens = 32,768 tokens per iteration
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5
decay_lr = False

eval_interval = 5
eval_iters = 40
log_interval = 1
