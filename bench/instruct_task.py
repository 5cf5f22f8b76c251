"""Benchmark: a small synthetic instruction task, trained and judged by its answers, over several seeds.

    python bench/instruct_task.py [--seeds=1,2,3] [--variant="--neftune_alpha=5"] [--label=NAME]
                                  [--max_iters=600] [--work_dir=DIR] [--results=bench/RESULTS.md]

The task (written by this script, the same for every seed and variant): four string operations with one
right answer each on 2 to 5 words of a 20-word vocabulary: reverse the words, sort them, name the last one,
count them. 3,000 training records and 200 held-out records whose word lists never occur in training.
For each seed, with this project's own commands:
1. data/prepare.py --format=instructions --template=plain --block_size=64 (once, for all seeds);
2. a tiny random GPT-2 (2 layers, 4 heads, 128 wide, 64 positions; weights seeded) stands in for a
   pretrained base, and launch/train.py trains it (full finetuning, --seed=S) plus the --variant overrides,
   which come last and so win (e.g. --variant="--mode=lora --lora_r=16", a NEFTune or LoRA-variant key);
3. launch/eval.py --generate --records=held_out.jsonl --json scores the greedy answers
   (trainer/metrics.py: exact match, ROUGE-L, BLEU).
A table of every seed with the mean and sd is printed and, with --results, appended to that file with the
command and the machine, so a variant is compared with the baseline by running this script twice.
"""
import argparse
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from tables import publish  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "paper", "music", "light", "sand", "north", "queen",
         "bread", "candle", "winter", "horse", "glass", "forest", "silver", "dream"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
OPERATIONS = {  # instruction -> the one right answer; answers start with a space: the words are the prompt's tokens
    "Reverse the words.": lambda ws: " " + " ".join(reversed(ws)),
    "Sort the words.": lambda ws: " " + " ".join(sorted(ws)),
    "Name the last word.": lambda ws: " " + ws[-1],
    "Count the words.": lambda ws: " " + NUMBERS[len(ws)],
}
TRAIN_ARGS = ["--block_size=64", "--batch_size=16", "--gradient_accumulation_steps=1", "--learning_rate=3e-3",
              "--warmup_iters=20", "--min_lr=3e-4", "--weight_decay=0.0", "--eval_iters=4", "--log_interval=50",
              "--mode=full", "--sample_max_new_tokens=0", "--tensorboard=False", "--always_save_checkpoint=False"]


def task_records(n_train=3000, n_held_out=200, seed=0):
    """(train, held_out) records: every word list of the held-out split is unseen in training."""
    rng = random.Random(seed)
    lists = set()
    while len(lists) < n_train + n_held_out:
        lists.add(tuple(rng.sample(WORDS, rng.randint(2, 5))))
    lists = sorted(lists)
    rng.shuffle(lists)
    ops = list(OPERATIONS)

    def record(i, words):
        op = ops[i % len(ops)]
        return {"instruction": op, "input": " " + " ".join(words), "output": OPERATIONS[op](list(words))}
    return ([record(i, ws) for i, ws in enumerate(lists[:n_train])],
            [record(i, ws) for i, ws in enumerate(lists[n_train:])])


def run(args, **kwargs):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_base(path, seed):
    """A random tiny GPT-2 in Hugging Face format: the 'pretrained' base every seed finetunes."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=128, n_positions=64)).save_pretrained(path)


def one_seed(work, seed, variant, max_iters):
    base, out = work / f"base-{seed}", work / f"run-{seed}"
    make_base(base, seed)
    start = time.time()
    stdout = run(["launch/train.py", f"--init_from={base}", "--dataset=ops", f"--data_dir={work}", f"--out_dir={out}",
                  "--overwrite=True", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
                  f"--eval_interval={max_iters}", f"--seed={seed}", *TRAIN_ARGS, *variant])
    minutes = (time.time() - start) / 60
    val = re.findall(rf"step {max_iters}: train loss [\d.]+, val loss ([\d.]+)", stdout)
    report = json.loads(run(["launch/eval.py", f"--out_dir={out}", "--generate",
                             f"--records={work / 'held_out.jsonl'}", f"--predictions={work / f'answers-{seed}.jsonl'}",
                             "--json"]).strip().splitlines()[-1])
    (result,) = report["results"]
    # exact match per operation: the answers file keeps the held-out records' order
    held_out = [json.loads(line) for line in (work / "held_out.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (work / f"answers-{seed}.jsonl").read_text().splitlines()]
    per_op = {op: statistics.mean(row["exact_match"] for row, r in zip(rows, held_out) if r["instruction"] == op)
              for op in OPERATIONS}
    return {"seed": seed, "val_loss": float(val[-1]) if val else float("nan"), "train_minutes": minutes,
            **{k: result[k] for k in ("exact_match", "rougeL", "bleu")}, "per_operation": per_op}


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows, label, command, max_iters):
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import torch
    lines = [f"### instruct_task: {label} ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
             f"load average {load}, torch {torch.__version__})", "",
             f"`{command}`: 4 string operations on 2-5 words (reverse, sort, last word, count), 3,000 training "
             f"records, {max_iters} iterations of 16 packed blocks of 64 tokens, a tiny random GPT-2 (2 x 128) per "
             f"seed; greedy answers to 200 held-out records (word lists unseen in training) scored by "
             f"`launch/eval.py --generate`.", "",
             "| seed | exact match | ROUGE-L | BLEU | val loss | exact match: reverse / sort / last / count | "
             "training minutes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = " / ".join(f"{v:.2f}" for v in r["per_operation"].values())
        lines.append(f"| {r['seed']} | {r['exact_match']:.4f} | {r['rougeL']:.4f} | {r['bleu']:.2f} | "
                     f"{r['val_loss']:.4f} | {ops} | {r['train_minutes']:.1f} |")
    cells = [mean_sd([r[k] for r in rows]) for k in ("exact_match", "rougeL", "bleu", "val_loss")]
    ops = " / ".join(f"{statistics.mean(r['per_operation'][op] for r in rows):.2f}" for op in OPERATIONS)
    lines.append(f"| mean ± sd | {cells[0][0]:.4f} ± {cells[0][1]:.4f} | {cells[1][0]:.4f} ± {cells[1][1]:.4f} | "
                 f"{cells[2][0]:.2f} ± {cells[2][1]:.2f} | {cells[3][0]:.4f} ± {cells[3][1]:.4f} | {ops} (means) | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--variant", default="", help="extra train.py overrides, e.g. \"--mode=lora --lora_r=16\"")
    p.add_argument("--label", default=None, help="the table's name (default: baseline, or the variant)")
    p.add_argument("--max_iters", type=int, default=600)
    p.add_argument("--work_dir", default=None, help="where data and runs go (default: a temporary folder)")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    variant = shlex.split(args.variant)
    command = "python bench/instruct_task.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, held_out = task_records()
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (work / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
        run(["data/prepare.py", f"--input={work / 'train.jsonl'}", "--name=ops", "--format=instructions",
             "--template=plain", "--block_size=64", f"--data_dir={work}"])
        rows = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows.append(one_seed(work, seed, variant, args.max_iters))
            print(json.dumps(rows[-1]), flush=True)
    publish(table(rows, args.label or (args.variant or "baseline"), command.strip(), args.max_iters), args.results)


if __name__ == "__main__":
    main()
