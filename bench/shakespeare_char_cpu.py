"""Benchmark: the full 2000-iteration shakespeare_char_cpu run, over several seeds, against nanoGPT.

    python bench/shakespeare_char_cpu.py [--seeds=1337,1,2,3,4] [--max_iters=2000] [--results=bench/RESULTS.md]

For every seed:
1. `deepspeed launch/train.py --recipe shakespeare_char_cpu --seed=S` (the documented command): its val
   loss at the last iteration (the recipe's 20 fixed val batches of 12) and its mean ms/iter from the
   console lines; then `python launch/eval.py --out_dir=...` on that checkpoint: the loss over the whole
   val split (111,540 characters), which has no sampling noise.
2. nanoGPT's model and procedure (bench/nanogpt_reference.py) with the same seed and hyperparameters,
   measured on the same 20 fixed batches, on the whole val split, and with nanoGPT's own estimator (20
   random val batches), the one behind its README's "about 1.88".
Then, for the first seed, the trainer's model trained by a plain PyTorch loop in this process (same
initial weights, same windows, torch AdamW), timed like the trainer: what the DeepSpeed path costs.
The tables are appended to the results file with the machine they ran on.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tables import publish  # noqa: E402

SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def prepare(data_dir):
    source = SHAKESPEARE if SHAKESPEARE.is_file() else None
    args = [sys.executable, str(REPO / "data/shakespeare_char/prepare.py"), f"--data_dir={data_dir}"]
    subprocess.run(args + ([f"--input={source}"] if source else []), check=True, cwd=REPO)


def recipe(data_dir, max_iters, seed):
    from trainer.config import resolve_config
    cfg, _ = resolve_config(["--recipe", "shakespeare_char_cpu", f"--data_dir={data_dir}", f"--seed={seed}",
                             f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}"])
    return cfg


def fixed_val_batches(data, cfg):
    """The recipe's evaluation: eval_iters fixed val batches, the windows the trainer evaluates on."""
    B = cfg.batch_size
    offsets = data.eval_offsets("val", cfg.eval_iters * B, cfg.seed)
    return [data.windows("val", offsets[i:i + B]) for i in range(0, len(offsets), B)]


def run_trainer(data_dir, out_dir, max_iters, seed):
    """(val loss at max_iters on the recipe's batches, ms/iter, loss on the whole val split)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    # always_save_checkpoint only makes sure the last iteration's weights are saved for launch/eval.py
    args = [str(launcher), str(REPO / "launch/train.py"), "--recipe", "shakespeare_char_cpu",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}", f"--seed={seed}", "--always_save_checkpoint=True"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"trainer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", proc.stdout)]
    ms = [float(v) for v in re.findall(r"([\d.]+)ms/iter", proc.stdout)]
    evaluated = subprocess.run([sys.executable, str(REPO / "launch/eval.py"), f"--out_dir={out_dir}", "--json"],
                               cwd=REPO, capture_output=True, text=True, check=True)
    full_val = json.loads(evaluated.stdout.strip().splitlines()[-1])["results"][0]["loss"]
    return val[-1], sum(ms[1:]) / len(ms[1:]), full_val  # the first ms interval includes warm-up


def run_plain(data_dir, max_iters, seed):
    """The same training in plain PyTorch: what a nanoGPT user would write by hand."""
    import torch
    import torch.nn.functional as F

    from trainer.data.sampler import TrainSampler
    from trainer.data.tokens import TokenData
    from trainer.model.gpt2 import build_model
    from trainer.optim.optimizer import param_groups
    from trainer.optim.schedule import lr_at

    cfg = recipe(data_dir, max_iters, seed)
    data = TokenData(Path(data_dir) / "shakespeare_char", cfg.block_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2))
    sampler = TrainSampler(data, cfg.seed)
    seqs = cfg.batch_size * cfg.gradient_accumulation_steps

    def loss_of(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    timed = 0.0
    for it in range(max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg)
        t0 = time.perf_counter()
        for x, y in sampler.iteration_batches(seqs, 0, 1, cfg.batch_size):
            loss_of(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it >= 10:  # like the trainer's mean, skip the warm-up
            timed += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        losses = [loss_of(x, y).item() for x, y in fixed_val_batches(data, cfg)]
    return sum(losses) / len(losses), 1000 * timed / (max_iters - 10)


def run_reference(data_dir, max_iters, seed):
    """nanoGPT's model and procedure: (20 fixed batches, whole val split, nanoGPT's 20 random batches)."""
    import torch

    from bench.nanogpt_reference import mean_loss, random_windows, train_reference
    from trainer.data.tokens import TokenData
    from trainer.optim.schedule import lr_at
    from trainer.tools.evaluate import stream_batches

    cfg = recipe(data_dir, max_iters, seed)
    data = TokenData(Path(data_dir) / "shakespeare_char", cfg.block_size)
    model = train_reference(cfg, data.tokens["train"], data.vocab_size, seed, lr_at)
    B, T = cfg.batch_size, cfg.block_size
    fixed = mean_loss(model, fixed_val_batches(data, cfg))
    whole = mean_loss(model, stream_batches(data.tokens["val"], T, 64))
    generator = torch.Generator().manual_seed(seed)
    nanogpt_estimate = mean_loss(model, [random_windows(data.tokens["val"], T, B, generator)
                                         for _ in range(cfg.eval_iters)])
    return fixed, whole, nanogpt_estimate


def mean_sd(values):
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="1337,1,2,3,4", help="comma-separated; the first is the recipe's and is timed")
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(tmp)
        for seed in seeds:
            trainer = run_trainer(tmp, Path(tmp) / f"out-{seed}", args.max_iters, seed)
            reference = run_reference(tmp, args.max_iters, seed)
            rows.append((seed, *trainer, *reference))
            print(f"seed {seed}: trainer {trainer[0]:.4f} (whole val {trainer[2]:.4f}, {trainer[1]:.1f} ms/iter); "
                  f"nanoGPT reference {reference[0]:.4f} (whole val {reference[1]:.4f}, its own estimate "
                  f"{reference[2]:.4f}); {time.time() - started:.0f} s so far", flush=True)
        plain_val, plain_ms = run_plain(tmp, args.max_iters, seeds[0])
    import torch
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    n = args.max_iters
    lines = [f"\n### shakespeare_char_cpu, {n} iterations, {len(seeds)} seeds ({time.strftime('%Y-%m-%d')}, {machine})\n",
             f"`python bench/shakespeare_char_cpu.py --seeds={args.seeds}`: val loss at iteration {n}. \"fixed 20\" is"
             " the recipe's evaluation (20 fixed val batches of 12 windows of 64), \"whole val\" every character of"
             " the val split once (`launch/eval.py`), \"random 20\" nanoGPT's own estimator (20 random val batches"
             " of 12), the one behind its README's \"about 1.88\".\n",
             "| seed | trainer: fixed 20 | trainer: whole val | nanoGPT reference: fixed 20 | nanoGPT reference: whole val "
             "| nanoGPT reference: random 20 |", "|---|---|---|---|---|---|"]
    for seed, t_val, _, t_full, r_fixed, r_full, r_nano in rows:
        lines.append(f"| {seed} | {t_val:.4f} | {t_full:.4f} | {r_fixed:.4f} | {r_full:.4f} | {r_nano:.4f} |")
    columns = list(zip(*rows))
    lines.append(f"| mean ± sd | {mean_sd(columns[1])} | {mean_sd(columns[3])} | {mean_sd(columns[4])} | "
                 f"{mean_sd(columns[5])} | {mean_sd(columns[6])} |")
    lines += ["", f"Speed, seed {seeds[0]}: the trainer against a plain PyTorch loop over the same model, initial weights"
              " and batches, in the same run.\n", f"| loop | val loss at {n} (fixed 20) | ms/iter |", "|---|---|---|",
              f"| trainer (`deepspeed launch/train.py --recipe shakespeare_char_cpu`) | {rows[0][1]:.4f} | {rows[0][2]:.1f} |",
              f"| plain PyTorch loop, same model and batches | {plain_val:.4f} | {plain_ms:.1f} |", ""]
    publish("\n".join(lines).strip("\n"), args.results)


if __name__ == "__main__":
    main()
