"""nanoGPT's config files run unchanged with launch/train.py: one of each kind nanoGPT ships (a character
model from scratch, a GPT-2 finetune that imports `time`, GPT-2 124M pretraining, eval-only of a hub
model), written here in nanoGPT's form (its keys, comments, spellings and computed values), each run for a
couple of iterations. The command-line overrides after the file only shrink the run (later values win,
as in nanoGPT) and point it at the test's data, tiny shapes and a tiny local GPT-2 for the hub's weights.
"""
import json
import re

import pytest

from conftest import REPO, python, run_cmd

pytestmark = pytest.mark.slow  # launches training runs

CHARACTER_MODEL = """# train a small character-level model on tiny Shakespeare
# good for a laptop

out_dir = 'out-shakespeare-char'
eval_interval = 250 # often: this small dataset overfits
eval_iters = 200
log_interval = 10

# save only when val improves
always_save_checkpoint = False

wandb_log = False # on the command line if wanted
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99

warmup_iters = 100

# on a laptop also add
# device = 'cpu'
# compile = False
"""

FINETUNE = """import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'

always_save_checkpoint = False

# 1 sequence * 32 accumulation * 1024 tokens per iteration
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# constant learning rate
learning_rate = 3e-5
decay_lr = False
"""

PRETRAIN_124M = """# GPT-2 (124M) on OpenWebText, one node of 8 GPUs:
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name='gpt2-124M'

# 12 * 1024 * 5 * 8 = 491,520 tokens per iteration
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
"""

EVAL_HUB_MODEL = """# evaluate GPT-2 as published
batch_size = 8
eval_iters = 500 # more batches, a better estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
"""

# nanoGPT README's command for a CPU, as typed (with train.py -> launch/train.py)
README_CPU = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
              "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
              "--lr_decay_iters=2000", "--dropout=0.0"]
SHORT = ["--max_iters=2", "--eval_interval=2", "--eval_iters=2", "--sample_max_new_tokens=0"]
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
        "--gradient_accumulation_steps=2"]


def launch(tmp_path, text, *overrides):
    config = tmp_path / "config" / "this.py"
    config.parent.mkdir(exist_ok=True)
    config.write_text(text)
    out_dir = tmp_path / "out"
    proc = run_cmd(python(REPO / "launch/train.py", config, *overrides, f"--out_dir={out_dir}"), cwd=REPO)
    return proc.stdout, out_dir


def val_at(stdout, step):
    return float(re.search(rf"step {step}: train loss [\d.]+, val loss ([\d.]+)", stdout)[1])


def test_the_character_model_from_scratch_with_nanogpts_readme_command(tmp_path, data_dir):
    stdout, out_dir = launch(tmp_path, CHARACTER_MODEL, *README_CPU, *SHORT, f"--data_dir={data_dir}")
    assert "note: device='cpu' (nanoGPT's) are DeepSpeed's to decide here" in stdout
    assert "this run: the CPU, backend gloo" in stdout
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["n_layer"] == 4 and cfg["block_size"] == 64 and cfg["compile"] is False and cfg["beta2"] == 0.99
    assert val_at(stdout, 2) < val_at(stdout, 0)


def test_a_gpt2_finetune_that_imports_time(tmp_path, data_dir, tiny_gpt2_dir):
    stdout, out_dir = launch(tmp_path, FINETUNE, *SHORT, f"--data_dir={data_dir}", f"--init_from={tiny_gpt2_dir}",
                             "--gradient_accumulation_steps=2", "--block_size=64")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert re.fullmatch(r"ft-\d+\.\d+", cfg["wandb_run_name"]) and cfg["decay_lr"] is False
    assert "time" not in cfg and "step 2:" in stdout and "note:" not in stdout


def test_gpt2_124m_pretraining_with_nanogpts_dtype_and_backend(tmp_path, data_dir):
    stdout, out_dir = launch(tmp_path, PRETRAIN_124M, *SHORT, *TINY, f"--data_dir={data_dir}", "--dataset=shakespeare",
                             "--wandb_log=False", "--dtype=float32", "--backend=gloo")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["dtype"] == "fp32" and cfg["weight_decay"] == 0.1 and cfg["wandb_project"] == "owt"
    assert json.loads((out_dir / "plan.json").read_text())["dtype"] == "fp32"
    assert "note: backend='gloo' (nanoGPT's)" in stdout and "step 2:" in stdout


def test_eval_only_of_a_hub_model(tmp_path, data_dir, tiny_gpt2_dir):
    stdout, out_dir = launch(tmp_path, EVAL_HUB_MODEL, f"--data_dir={data_dir}", f"--init_from={tiny_gpt2_dir}",
                             "--dataset=shakespeare", "--eval_iters=2", "--block_size=64")
    assert val_at(stdout, 0) > 0 and "iter 1" not in stdout
    assert not (out_dir / "checkpoints").exists()  # evaluated once, nothing trained or saved
