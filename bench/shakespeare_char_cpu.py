"""Benchmark: the full 2000-iteration shakespeare_char_cpu run, trainer vs a plain PyTorch loop.

    python bench/shakespeare_char_cpu.py [--max_iters=2000] [--results=bench/RESULTS.md]

1. Runs `deepspeed launch/train.py --recipe shakespeare_char_cpu` (the documented command) and
   reads its val loss at the last iteration and its mean ms/iter from the console lines.
2. In this process, trains the same model (same initial weights, same windows from the same
   sampler, same schedule, torch AdamW) with a plain PyTorch loop, and times it the same way.
Both land in a markdown table appended to the results file, with the machine they ran on.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def prepare(data_dir):
    source = SHAKESPEARE if SHAKESPEARE.is_file() else None
    args = [sys.executable, str(REPO / "data/shakespeare_char/prepare.py"), f"--data_dir={data_dir}"]
    subprocess.run(args + ([f"--input={source}"] if source else []), check=True, cwd=REPO)


def run_trainer(data_dir, out_dir, max_iters):
    launcher = Path(sys.executable).with_name("deepspeed")
    args = [str(launcher), str(REPO / "launch/train.py"), "--recipe", "shakespeare_char_cpu",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"trainer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", proc.stdout)]
    ms = [float(v) for v in re.findall(r"([\d.]+)ms/iter", proc.stdout)]
    return val[-1], sum(ms[1:]) / len(ms[1:])  # the first interval includes warm-up


def run_plain(data_dir, max_iters):
    """The same training in plain PyTorch: what a nanoGPT user would write by hand."""
    import torch
    import torch.nn.functional as F

    from trainer.config import resolve_config
    from trainer.data import TokenData, TrainSampler, eval_offsets
    from trainer.engine import lr_at, param_groups
    from trainer.model import build_model

    cfg, _ = resolve_config(["--recipe", "shakespeare_char_cpu", f"--data_dir={data_dir}",
                             f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}"])
    data = TokenData(Path(data_dir) / "shakespeare_char", cfg["block_size"])
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, data.vocab_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["learning_rate"],
                                  betas=(cfg["beta1"], cfg["beta2"]))
    sampler = TrainSampler(data, cfg["seed"])
    seqs = cfg["batch_size"] * cfg["gradient_accumulation_steps"]

    def loss_of(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    timed = 0.0
    for it in range(max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg)
        t0 = time.perf_counter()
        for x, y in sampler.iteration_batches(seqs, 0, 1, cfg["batch_size"]):
            loss_of(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it >= 10:  # like the trainer's mean, skip the warm-up
            timed += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        offsets = eval_offsets(data, "val", cfg["eval_iters"] * cfg["batch_size"], cfg["seed"])
        losses = [loss_of(*data.windows("val", offsets[i:i + cfg["batch_size"]])).item()
                  for i in range(0, len(offsets), cfg["batch_size"])]
    return sum(losses) / len(losses), 1000 * timed / (max_iters - 10)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(tmp)
        trainer_val, trainer_ms = run_trainer(tmp, Path(tmp) / "out", args.max_iters)
        plain_val, plain_ms = run_plain(tmp, args.max_iters)
    import torch
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    table = (f"\n### shakespeare_char_cpu, {args.max_iters} iterations ({time.strftime('%Y-%m-%d')}, {machine})\n\n"
             f"| loop | val loss at {args.max_iters} | ms/iter |\n|---|---|---|\n"
             f"| trainer (`deepspeed launch/train.py --recipe shakespeare_char_cpu`) | {trainer_val:.4f} | "
             f"{trainer_ms:.1f} |\n"
             f"| plain PyTorch loop, same model and batches | {plain_val:.4f} | {plain_ms:.1f} |\n"
             f"| nanoGPT's published figure for this configuration | about 1.88 | |\n")
    print(table)
    with open(args.results, "a") as f:
        f.write(table)


if __name__ == "__main__":
    main()
