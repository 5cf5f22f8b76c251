# Instruction-tune gpt2-medium with LoRA on Alpaca-style data (response-only loss, packed examples).
# Data: python data/prepare.py --input=alpaca_data.json --name=alpaca --format=instructions
#   (Alpaca's prompt template, examples packed into blocks of block_size + 1 = 1025 tokens)
# Train: deepspeed launch/train.py --recipe alpaca_lora
# Try:   python launch/sample.py --out_dir=out-alpaca-lora --prompt_template=alpaca --start="Give three tips for staying healthy."
# Check: python launch/eval.py --out_dir=out-alpaca-lora --dataset=shakespeare --compare_base   (what general text lost)
out_dir = 'out-alpaca-lora'
init_from = 'gpt2-medium'
dataset = 'alpaca'
always_save_checkpoint = False

# LoRA on every projection (attention c_attn/c_proj and MLP c_fc/c_proj). r=16 with alpha=32 (scale 2)
# is the common choice for instruction tuning; a few million trainable parameters instead of 355M.
mode = 'lora'
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = ['c_attn', 'c_proj', 'c_fc']

# 8 x 4 = 32 packed blocks of 1024 tokens per iteration: about 32k tokens, ~150-200 Alpaca examples,
# close to Alpaca's own batch of 128 examples. block_size must equal prepare's --block_size.
batch_size = 8
gradient_accumulation_steps = 4
block_size = 1024

# About 3 epochs (Alpaca's own recipe): max_iters and lr_decay_iters come from the dataset size.
# 1e-4 suits LoRA (adapters start at zero and need a larger step than full finetuning's 2e-5),
# warmup over the first ~3% of a typical 3-epoch Alpaca run, cosine decay to a tenth.
max_epochs = 3
learning_rate = 1e-4
decay_lr = True
warmup_iters = 30
min_lr = 1e-5
# Mild decay on the adapter matrices pulls them towards zero, i.e. towards the base model.
weight_decay = 0.05
dropout = 0.0  # LoRA's own dropout regularises; the base stays as pretrained

eval_interval = 100
eval_iters = 40  # x batch_size = 320 val blocks, each used once (about 1,500 val examples)
log_interval = 10
sample_max_new_tokens = 0  # the loop's sample prompt is not an instruction; use sample.py --prompt_template
