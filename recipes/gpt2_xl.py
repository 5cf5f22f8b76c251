# Finetune GPT-2 (gpt2-xl) on tiny Shakespeare (GPT-2 BPE: python data/shakespeare/prepare.py).
# The planner picks ZeRO stage, offload, checkpointing, micro-batch and mode for your GPU.
out_dir = 'out-finetune-gpt2-xl'
init_from = 'gpt2-xl'
dataset = 'shakespeare'
always_save_checkpoint = False

# 1 x 8 sequences of 1024 tokens per iteration
batch_size = 1
gradient_accumulation_steps = 8
block_size = 1024

learning_rate = 3e-5
decay_lr = True
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 3e-6
max_iters = 5000

eval_interval = 250
eval_iters = 200
log_interval = 10
