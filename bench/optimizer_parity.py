"""Quality parity of the planner's memory tools: 8-bit against 32-bit AdamW, bf16 against fp32 gradient
accumulation, each trained by the documented command on this CPU with the same seeds.

    python bench/optimizer_parity.py [--seeds=1337,1,2,3,4] [--only=adamw8bit,lora,accum,masters_1e-4,masters_3e-5]
                                     [--results=FILE]

  adamw8bit  shakespeare_char_cpu (4 layers x 128, 2000 iterations) with --optimizer=adamw8bit and =adamw: its
             matrices (>= 4096 elements) get 8-bit states, LayerNorms and biases 32-bit (bitsandbytes' rule)
  lora       a LoRA finetune (r=8) of a character model 4 layers x 512 wide, pretrained here for 600 iterations
             and exported (launch/merge_adapter.py), 400 iterations, adamw8bit and adamw: LoRA's A and B are
             512 x 8 = 4096 elements, so they get 8-bit states
  accum      shakespeare_char_cpu in bf16 with micro-batch 1 (12 accumulation steps per iteration), 500
             iterations (about 0.15 s per iteration on this CPU, one thread), --grad_accum_dtype=bf16
             (FP16_UnfusedOptimizer) and =fp32 (BF16_Optimizer)
  masters_1e-4, masters_3e-5
             bf16 weights without fp32 masters (--master_weights): a full finetune of the same pretrained and
             exported 4 x 512 model, as a user finetunes (bf16, constant learning rate 1e-4 or 3e-5, the
             recipe's batch of 12), 200 iterations, fp32 masters (BF16_Optimizer, the baseline), plain bf16
             (the danger: updates under bf16's rounding step are lost), Kahan summation (torch-optimi),
             stochastic rounding (torchao), 4-bit states (torchao's AdamW4bit with bf16_sr), the step inside the
             backward (bf16_kahan, per-tensor clipping; no accumulation, which it refuses), Adam-mini's
             factored second moments (on plain bf16 weights, and against AdamW in fp32 training), and LoRA on
             the same task (r=16, alpha=32 as alpaca_lora, the same learning rate) for the ranking
For every run: the val loss at the last iteration on the recipe's fixed val batches and on the whole val split
(launch/eval.py); the table gives each seed and the mean ± sd, and is appended to the results file.
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
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
EXPERIMENTS = {
    "adamw8bit": ("optimizer", ("adamw", "adamw8bit"), ["--recipe", "shakespeare_char_cpu"]),
    "lora": ("optimizer", ("adamw", "adamw8bit"), ["--recipe", "shakespeare_char_cpu", "--mode=lora", "--lora_r=8",
                                                   "--max_iters=400", "--lr_decay_iters=400", "--learning_rate=3e-3",
                                                   "--warmup_iters=20", "--eval_interval=400"]),
    "accum": ("grad_accum_dtype", ("fp32", "bf16"), ["--recipe", "shakespeare_char_cpu", "--dtype=bf16",
                                                     "--micro_batch_size=1", "--max_iters=500",
                                                     "--lr_decay_iters=500", "--eval_interval=500"]),
    **{f"masters_{lr}": ("master_weights", ("fp32", "bf16", "bf16_kahan", "bf16_sr", "bf16_sr+adamw4bit",
                                            "bf16_kahan+in_backward", "bf16_sr+adamw4bit+in_backward",
                                            "bf16+adam_mini", "fp32_weights", "fp32_weights+adam_mini", "lora"),
                         ["--recipe", "shakespeare_char_cpu", "--dtype=bf16", "--mode=full", "--max_iters=200",
                          "--decay_lr=False", f"--learning_rate={lr}", "--warmup_iters=0", "--eval_interval=200"])
       for lr in ("1e-4", "3e-5")},
}
# Rows that are more than one flag: the label in the table, the words that replace `--{key}={label}`.
# lora: the same finetune with adapters instead (alpaca_lora's r=16, alpha=32 on every projection, fp32 masters
# of the adapters), at the table's learning rate, for the ranking of a tool that fails the quality rule.
# bf16_kahan+in_backward: the step inside the backward (gradient release), each tensor's gradient clipped to
# grad_clip on its own; the recipe's batch of 12 is one micro-batch, so there is no accumulation to refuse.
# bf16_sr+adamw4bit+in_backward: the same over torchao's 4-bit AdamW (the tools of gpt2-xl's 10 GB plan).
# bf16+adam_mini: Adam-mini's factored second moments where a bf16 plan can run it, on the bf16 weights themselves
# (plain rounding: no library compensates Adam-mini's update). fp32_weights, fp32_weights+adam_mini: AdamW and
# Adam-mini in fp32 training, so that the factoring's own effect is seen without bf16's (FACTORED, below).
COMPOUND = {"bf16_sr+adamw4bit": ["--master_weights=bf16_sr", "--optimizer=adamw4bit"],
            "bf16_kahan+in_backward": ["--master_weights=bf16_kahan", "--optimizer_in_backward=True",
                                       "--micro_batch_size=12"],
            "bf16_sr+adamw4bit+in_backward": ["--master_weights=bf16_sr", "--optimizer=adamw4bit",
                                              "--optimizer_in_backward=True", "--micro_batch_size=12"],
            "bf16+adam_mini": ["--master_weights=bf16", "--optimizer=adam_mini"],
            "fp32_weights": ["--dtype=fp32", "--master_weights=auto", "--optimizer=adamw"],
            "fp32_weights+adam_mini": ["--dtype=fp32", "--master_weights=auto", "--optimizer=adam_mini"],
            "lora": ["--mode=lora", "--lora_r=16", "--lora_alpha=32", "--master_weights=fp32"]}
# The factoring alone: Adam-mini against AdamW, both on fp32 weights in fp32 training (the plain path), paired
FACTORED = ("fp32_weights", "fp32_weights+adam_mini")


def replace(words, extra):
    """`words` with `extra` appended, in place of the words that set the same keys."""
    keys = {w.split("=")[0] for w in extra}
    return [w for w in words if w.split("=")[0] not in keys] + extra


def variant(words, key, value):
    """The launch/train.py words of one row: the experiment's, with `value` set (a compound row's flags)."""
    return replace(words, COMPOUND.get(value, [f"--{key}={value}"]))


def run(args, cwd=REPO):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(data_dir, out_dir, words, seed, whole_val=True):
    """(val loss at the last evaluation on the recipe's fixed batches, on the whole val split or nan)."""
    out = run([REPO / "launch/train.py", *words, f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--seed={seed}",
               "--always_save_checkpoint=True", "--sample_max_new_tokens=0", "--tensorboard=False"])
    fixed = float(re.findall(r"val loss ([\d.]+)", out)[-1])
    if not whole_val:
        return fixed, float("nan")
    report = json.loads(run([REPO / "launch/eval.py", f"--out_dir={out_dir}", "--json"]).strip().splitlines()[-1])
    return fixed, report["results"][0]["loss"]


def lora_base(data_dir, work):
    """A 4 x 512 character model pretrained here and exported in Hugging Face format: the LoRA runs' base."""
    out, export = work / "base-run", work / "base"
    if not (export / "config.json").is_file():
        run([REPO / "launch/train.py", "--recipe", "shakespeare_char_cpu", f"--data_dir={data_dir}",
             f"--out_dir={out}", "--n_embd=512", "--n_head=8", "--max_iters=600", "--lr_decay_iters=600",
             "--eval_interval=600", "--always_save_checkpoint=True", "--sample_max_new_tokens=0",
             "--tensorboard=False"])
        run([REPO / "launch/merge_adapter.py", f"--out_dir={out}", f"--export_dir={export}"])
    return export


def mean_sd(values):
    if any(v != v for v in values):  # not measured (--whole_val=False)
        return "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def append(results, section, started):
    """One experiment's table, appended as soon as it is measured: a failure later keeps it."""
    import torch
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    table = (f"\n### Quality parity of the memory tools ({time.strftime('%Y-%m-%d')}, {machine}, "
             f"{(time.time() - started) / 60:.0f} min so far)\n{section}\n")
    print(table, flush=True)
    with open(results, "a") as f:
        f.write(table)


# The paired quality rule (docs/plan.md): runs of one seed see the same batches, so a tool's effect is its
# per-seed difference against fp32 masters; it passes where, at each learning rate, the mean difference is
# within PAIRED_MEAN and every seed's within PAIRED_EACH (a fifth and a half of the seed-to-seed sd here)
PAIRED_MEAN, PAIRED_EACH = 0.002, 0.005


def paired_table(rows, seeds, values, baseline="fp32"):
    """Each row's per-seed val loss difference against the baseline, its mean and the rule's verdict."""
    lines = [f"| {'tool'} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | paired rule |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for value in values:
        if value == baseline:
            continue
        diffs = [rows[value, s] - rows[baseline, s] for s in seeds]
        mean = statistics.mean(diffs)
        verdict = "passes" if abs(mean) <= PAIRED_MEAN and max(map(abs, diffs)) <= PAIRED_EACH else "fails"
        if value == "lora":
            verdict = "(the ranking: another mode)"
        lines.append(f"| {value} | " + " | ".join(f"{d:+.4f}" for d in diffs) + f" | {mean:+.4f} | {verdict} |")
    return lines


def summarize(log):
    """The masters tables from a run's own progress lines (a run stopped early, or several run in parallel)."""
    rows, order = {}, {}
    for line in Path(log).read_text().splitlines():
        m = re.match(r"(masters_\S+) master_weights=(\S+) seed (\d+): val ([\d.]+)", line)
        if m:
            name, value, seed = m.group(1), m.group(2), int(m.group(3))
            rows.setdefault(name, {})[value, seed] = float(m.group(4))
            order.setdefault(name, {}).setdefault(value, None)
    for name, got in rows.items():
        values = list(order[name])
        seeds = [s for s in dict.fromkeys(s for _, s in got) if all((v, s) in got for v in values)]
        print(f"\n#### {name}: per-seed val loss (seeds with every row: {', '.join(map(str, seeds))})\n")
        print("| master_weights | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for value in values:
            vals = [got[value, s] for s in seeds]
            print(f"| {value} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {mean_sd(vals)} |")
        if "fp32" in values:  # (a row added later may run without its baseline: --values)
            print(f"\n{name}: difference against fp32 masters, seed by seed (negative: lower val loss)\n")
            print("\n".join(paired_table(got, seeds, values)))
        if all(v in values for v in FACTORED):
            print(f"\n{name}: Adam-mini against AdamW in fp32 training, seed by seed\n")
            print("\n".join(paired_table(got, seeds, FACTORED, baseline=FACTORED[0])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1337,1,2,3,4")
    ap.add_argument("--only", default=",".join(EXPERIMENTS))
    ap.add_argument("--lora_seeds", default="1337,1,2", help="seeds of the other experiments (lora, accum, masters_*)")
    ap.add_argument("--finetune_iters", type=int, default=200, help="iterations of the masters_* finetunes")
    ap.add_argument("--whole_val", default="True", choices=("True", "False"),
                    help="also evaluate each run on the whole val split (launch/eval.py; about 2 min a run here)")
    ap.add_argument("--values", default=None, help="only these rows of each experiment (comma-separated, e.g. "
                                                   "fp32,bf16_sr+adamw4bit+in_backward): a row added later")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--work_dir", default=None, help="keep the data and runs here (default: a temporary folder)")
    ap.add_argument("--summarize", default=None, help="print the masters tables (per seed, paired) from the "
                                                      "progress lines of this run's log, and stop")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data_dir = work / "data"
        if not (data_dir / "shakespeare_char" / "train.bin").is_file():
            run([REPO / "data/shakespeare_char/prepare.py", f"--data_dir={data_dir}", f"--input={SHAKESPEARE}"])
        for name in args.only.split(","):
            key, values, words = EXPERIMENTS[name]
            if args.values:
                values = tuple(v for v in values if v in args.values.split(","))
            seeds = [int(s) for s in (args.seeds if name == "adamw8bit" else args.lora_seeds).split(",")]
            if name == "lora" or name.startswith("masters"):  # finetunes of the same pretrained model
                words = [*words, f"--init_from={lora_base(data_dir, work)}"]
            if name.startswith("masters"):
                words = replace(words, [f"--max_iters={args.finetune_iters}", f"--eval_interval={args.finetune_iters}"])
            rows = {}
            for seed in seeds:  # every row's first seed first: a run cut short still compares them all
                for value in values:
                    rows[value, seed] = train(data_dir, work / f"{name}-{value}-{seed}", variant(words, key, value), seed,
                                              args.whole_val == "True")
                    print(f"{name} {key}={value} seed {seed}: val {rows[value, seed][0]:.4f} (whole val "
                          f"{rows[value, seed][1]:.4f}); {time.time() - started:.0f} s so far", flush=True)
            seed_flag = "seeds" if name == "adamw8bit" else "lora_seeds"
            command = f"python bench/optimizer_parity.py --only={name} --{seed_flag}={','.join(map(str, seeds))}"
            if name.startswith("masters"):
                command += f" --finetune_iters={args.finetune_iters}"
            if args.whole_val == "False":
                command += " --whole_val=False"
            lines = [f"\n#### {name}: `{key}` {' vs '.join(values)} (`{command}`; launch/train.py "
                     f"{' '.join(w for w in words if not w.startswith('--init_from'))})\n",
                     f"| {key} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | whole val mean ± sd |",
                     "|---|" + "---|" * (len(seeds) + 2)]
            for value in values:
                fixed = [rows[value, s][0] for s in seeds]
                whole = [rows[value, s][1] for s in seeds]
                lines.append(f"| {value} | " + " | ".join(f"{v:.4f}" for v in fixed) +
                             f" | {mean_sd(fixed)} | {mean_sd(whole)} |")
            if name.startswith("masters"):
                fixed = {k: v[0] for k, v in rows.items()}
                if "fp32" in values:
                    lines += ["", "Against fp32 masters, seed by seed:", "", *paired_table(fixed, seeds, values)]
                if all(v in values for v in FACTORED):
                    lines += ["", "Adam-mini against AdamW in fp32 training, seed by seed:", "",
                              *paired_table(fixed, seeds, FACTORED, baseline=FACTORED[0])]
            append(args.results, "\n".join(lines), started)


if __name__ == "__main__":
    main()
