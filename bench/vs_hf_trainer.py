"""Benchmark: the trainer against Hugging Face's Trainer, iteration for iteration and at start-up.

    python bench/vs_hf_trainer.py [--rounds=3] [--short=2] [--long=10] [--modes=full,lora] [--results=FILE]
    python bench/vs_hf_trainer.py --dry_run        # a tiny GPT-2, 1 and 2 iterations, one round (tests/)
    python bench/vs_hf_trainer.py --profile        # one iteration of each under torch.profiler
    python bench/vs_hf_trainer.py --from_log=LOG --rounds=3   # the table from saved progress lines

The same GPT-2 124M shape for both (random weights saved once in Hugging Face format, block 128, micro-batch
2, one accumulation step, AdamW betas (0.9, 0.999) without weight decay, lr 3e-5 constant, clipping at 1.0,
dropout 0, fp32; on a GPU with bf16 also a bf16 row), on tiny Shakespeare in GPT-2 tokens:
- the trainer by its documented command, with its own plan:
  `deepspeed launch/train.py --init_from=DIR --dataset=shakespeare --mode=full|lora ... --log_level=debug`;
- transformers' Trainer (`python bench/vs_hf_trainer.py --hf_worker ...`, this file): GPT2LMHeadModel from
  the same folder, peft's LoRA for mode lora (r 8 on c_attn, c_proj, c_fc, dropout 0, as the trainer's
  --lora_targets), a Dataset of random windows of the same tokens, save_strategy "no", no evaluation.
Per-iteration time is the difference of a long and a short run's wall time after each run's own start-up,
over the difference of their iterations (the trainer's evaluations at the start and the end and its last
save cancel out, and the start-up's variance on a loaded machine stays out), and the same difference of
the CPU seconds of each command's processes (getrusage of the reaped children), which another job's load
changes far less than wall time;
start-up is each process's own account of the seconds from its command to its first iteration (the trainer's
`--log_level=debug` table, the worker's own clock from its process's start, trainer/startup.py). The runs
interleave (trainer short, HF short, trainer long, HF long, per mode and round), so that drift in a shared
machine's load falls on both; the table gives the median and the spread (min-max) over the rounds. Every
process runs on one thread (OMP_NUM_THREADS=1), the same for both.
"""
import argparse
import math
import os
import platform
import re
import resource
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
BLOCK, MICRO, LR, BETAS, CLIP = 128, 2, 3e-5, (0.9, 0.999), 1.0
LORA = {"r": 8, "alpha": 16, "targets": ["c_attn", "c_proj", "c_fc"]}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64}  # --dry_run; otherwise GPT2Config()'s 124M


def prepare(root, shape):
    """tiny Shakespeare in GPT-2 tokens, and a random GPT-2 of the shape in Hugging Face format."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    subprocess.run([sys.executable, str(REPO / "data/shakespeare/prepare.py"), f"--input={SHAKESPEARE}",
                    f"--data_dir={root / 'data'}"], check=True, cwd=REPO, capture_output=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=1024, **shape)).save_pretrained(root / "model")
    return root / "data", root / "model"


def trainer_command(data_dir, model_dir, out_dir, mode, dtype, iters):
    from trainer.launcher import free_port
    launcher = Path(sys.executable).with_name("deepspeed")
    # its own rendezvous port: another deepspeed run on the machine may hold the default 29500
    args = [str(launcher), f"--master_port={free_port()}", str(REPO / "launch/train.py"), f"--init_from={model_dir}", f"--data_dir={data_dir}",
            "--dataset=shakespeare", f"--out_dir={out_dir}", "--overwrite=True", f"--mode={mode}",
            f"--block_size={BLOCK}", f"--batch_size={MICRO}", f"--micro_batch_size={MICRO}",
            "--gradient_accumulation_steps=1", f"--max_iters={iters}", "--decay_lr=False",
            f"--learning_rate={LR}", "--weight_decay=0.0", f"--beta1={BETAS[0]}", f"--beta2={BETAS[1]}",
            f"--grad_clip={CLIP}", "--dropout=0.0", f"--dtype={dtype}", "--eval_iters=1", "--eval_interval=100000",
            "--always_save_checkpoint=False", "--tensorboard=False", "--sample_max_new_tokens=0",
            "--log_level=debug"]
    if mode == "lora":
        args += [f"--lora_r={LORA['r']}", f"--lora_alpha={LORA['alpha']}", "--lora_dropout=0.0",
                 f"--lora_targets={LORA['targets']!r}"]
    return args


def hf_command(data_dir, model_dir, out_dir, mode, dtype, iters):
    return [sys.executable, str(Path(__file__).resolve()), "--hf_worker", f"--data_dir={data_dir}",
            f"--model_dir={model_dir}", f"--out_dir={out_dir}", f"--mode={mode}", f"--dtype={dtype}",
            f"--iters={iters}"]


def timed(args):
    """(wall seconds of the whole command, its start-up seconds to the first iteration as it reports them,
    the launcher's share of those or 0, CPU seconds of the command's processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every process of the command, once reaped
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    total = re.search(r"start-up: ([\d.]+) s from the command to the first iteration", out)
    launcher = re.search(r"launcher \(its own processes\)\s+([\d.]+) s", out)
    if total is None:
        sys.exit(f"no start-up line in the output of {' '.join(map(str, args))}:\n{out[-3000:]}")
    return wall, float(total.group(1)), float(launcher.group(1)) if launcher else 0.0, cpu


def hf_worker(args):
    """One Hugging Face Trainer run of --iters iterations; prints its start-up line like the trainer's."""
    from trainer.startup import process_start
    started = process_start() or time.time()
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    tokens = np.memmap(Path(args.data_dir) / "shakespeare" / "train.bin", dtype=np.uint16, mode="r")

    class Windows(torch.utils.data.Dataset):
        """Random windows of the tokens (labels are the inputs: the model shifts them)."""
        def __init__(self, count):
            self.starts = np.random.default_rng(0).integers(0, len(tokens) - BLOCK, count)

        def __len__(self):
            return len(self.starts)

        def __getitem__(self, i):
            ids = torch.from_numpy(tokens[self.starts[i]:self.starts[i] + BLOCK].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    class StartupLine(TrainerCallback):
        def on_step_begin(self, training_args, state, control, **kw):
            if state.global_step == 0:
                print(f"start-up: {time.time() - started:.1f} s from the command to the first iteration", flush=True)

    class Profile(TrainerCallback):
        """--profile: one iteration under torch.profiler after PROFILED of warm-up."""
        def on_step_begin(self, training_args, state, control, **kw):
            if state.global_step == PROFILED:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, training_args, state, control, **kw):
            if state.global_step == PROFILED + 1:  # counted once the step is done
                seconds = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                print(op_table(self.prof, seconds, args.rows))

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(args.model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=LORA["targets"], fan_in_fan_out=True))
    training = TrainingArguments(
        output_dir=args.out_dir, per_device_train_batch_size=MICRO, gradient_accumulation_steps=1,
        max_steps=args.iters, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=CLIP, optim="adamw_torch",
        bf16=args.dtype == "bf16", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True)
    Trainer(model=model, args=training, train_dataset=Windows(MICRO * args.iters),
            callbacks=[Profile() if args.profile else StartupLine()]).train()


PROFILED = 2  # iterations before the profiled one (warm-up)


def op_table(prof, seconds, rows):
    return (f"one iteration: {1000 * seconds:.0f} ms wall\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def profile_trainer(args):
    """One iteration of the trainer under torch.profiler, after warm-up: the loop's per-iteration work (the
    learning rate, train_iteration's micro-steps, the guard's all-reduce) on a Run built by build_run."""
    import torch
    from trainer.config import resolve_config
    from trainer.launcher import free_port
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed
    deepspeed.init_distributed()
    from trainer.optim.schedule import lr_at
    from trainer.run import oom
    from trainer.run.engine import set_lr
    from trainer.run.loop import train_iteration
    from trainer.run.ranks import agree_any
    from trainer.run.setup import build_run
    command = trainer_command(args.data_dir, args.model_dir, args.out_dir, args.mode, args.dtype, PROFILED + 1)
    cfg, _ = resolve_config(command[3:])
    run = build_run(cfg)
    recovery = oom.Recovery(run)

    def iteration():
        set_lr(run.engine, lr_at(run.iter_num, cfg))
        loss, grad_norm = train_iteration(run, recovery)
        run.iter_num += 1
        agree_any([False, not math.isfinite(loss + (grad_norm or 0.0))], run.device)

    for _ in range(PROFILED):
        iteration()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        iteration()
        seconds = time.perf_counter() - start
    print(op_table(prof, seconds, args.rows))


def spread(values, fmt="{:.0f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def machine():
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def profile(args):
    """--profile: each side's one-iteration op table, per mode, in its own process (fp32)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, model_dir = prepare(Path(tmp), TINY if args.dry_run else {})
        for mode in args.modes.split(","):
            common = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--out_dir={Path(tmp) / 'out'}",
                      f"--mode={mode}", "--dtype=fp32", f"--rows={args.rows}"]
            for side, extra in (("trainer", ["--trainer_profile_worker"]),
                                ("HF Trainer", ["--hf_worker", "--profile", f"--iters={PROFILED + 1}"])):
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *extra, *common], cwd=REPO,
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{side} profile failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                table = proc.stdout[proc.stdout.index("one iteration:"):]
                table = table[:table.index("Self CPU time total")].strip()
                sections.append(f"#### {mode}, {side}\n\n```\n{table}\n```")
                print(sections[-1], flush=True)
    shape = "tiny GPT-2 (2 x 64)" if args.dry_run else "GPT-2 124M"
    header = (f"### Profile of one iteration, the trainer and Hugging Face's Trainer, {shape} "
              f"({time.strftime('%Y-%m-%d')}, {machine()})\n\n`python bench/vs_hf_trainer.py --profile"
              f"{' --dry_run' if args.dry_run else ''}{f' --rows={args.rows}' if args.rows != 15 else ''}`: torch.profiler over the iteration after {PROFILED} of "
              "warm-up, one thread, ops by self CPU time.")
    publish("\n\n".join([header, *sections]), args.results)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--short", type=int, default=2)
    p.add_argument("--long", type=int, default=10)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--dry_run", action="store_true", help="a tiny GPT-2, 1 and 2 iterations, one round")
    p.add_argument("--profile", action="store_true", help="instead: one iteration of each under torch.profiler")
    p.add_argument("--rows", type=int, default=15, help="--profile: the ops shown, by self CPU time")
    p.add_argument("--results", default=None, help="append the table to this file (bench/RESULTS.md)")
    p.add_argument("--from_log", default=None, help="the table from a run's saved progress lines (one stopped early: "
                   "its complete rounds), measuring nothing")
    # the Hugging Face side, run by this file in its own process
    p.add_argument("--hf_worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("data_dir", "model_dir", "out_dir", "mode", "dtype"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, help=argparse.SUPPRESS)
    p.add_argument("--trainer_profile_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    if args.trainer_profile_worker:
        return profile_trainer(args)
    if args.dry_run:
        args.rounds, args.short, args.long = 1, 1, 2
    if args.profile:
        return profile(args)
    import torch
    dtypes = ["fp32"] + (["bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else [])
    cases = [(mode, dtype) for mode in args.modes.split(",") for dtype in dtypes]
    runs = runs_from_log(Path(args.from_log).read_text(), cases) if args.from_log else measure(args, cases)
    publish(table(args, runs), args.results)


SIDES = {"trainer": trainer_command, "HF Trainer": hf_command}
PROGRESS = re.compile(r"^round (\d+)/\d+ (\w+) (\w+) (trainer|HF Trainer) (\d+) iterations: ([\d.]+) s "
                      r"\(start-up ([\d.]+) s, launcher ([\d.]+) s(?:, cpu ([\d.]+) s)?\)", re.M)


def measure(args, cases):
    """Every run, interleaved: [(round, (mode, dtype), side, iterations, wall s, start-up s, launcher s)],
    each also printed as a progress line (which --from_log reads back)."""
    runs, began = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, model_dir = prepare(Path(tmp), TINY if args.dry_run else {})
        for r in range(args.rounds):
            for case in cases:
                for iters in (args.short, args.long):
                    for side, command in SIDES.items():
                        wall, startup, launcher, cpu = timed(command(data_dir, model_dir, Path(tmp) / "out", *case,
                                                                     iters))
                        runs.append((r + 1, case, side, iters, wall, startup, launcher, cpu))
                        print(f"round {r + 1}/{args.rounds} {case[0]} {case[1]} {side} {iters} iterations: "
                              f"{wall:.1f} s (start-up {startup:.1f} s, launcher {launcher:.1f} s, cpu {cpu:.1f} s); "
                              f"{time.time() - began:.0f} s so far", flush=True)
    return runs


def runs_from_log(text, cases):
    """measure()'s runs from its progress lines (a run stopped early: only its complete rounds count)."""
    runs = [(int(m[1]), (m[2], m[3]), m[4], int(m[5]), float(m[6]), float(m[7]), float(m[8]),
             float(m[9]) if m[9] else None) for m in PROGRESS.finditer(text)]
    per_round = 4 * len(cases)  # short and long, for each side
    runs = [run for run in runs if run[1] in cases]
    complete = {r for r in {run[0] for run in runs} if sum(1 for run in runs if run[0] == r) == per_round}
    if not complete:
        sys.exit("error: no complete round in the log; pass the --modes it measured")
    return [run for run in runs if run[0] in complete]


def table(args, runs):
    """The markdown table of the runs: per mode and dtype, median (min to max) over the rounds."""
    rounds = sorted({run[0] for run in runs})
    iters = sorted({run[3] for run in runs})
    short, long = iters[0], iters[-1]
    cases = list(dict.fromkeys(run[1] for run in runs))
    # the wall time after each run's own start-up: its variance (imports on a loaded machine) stays out
    after = {(r, case, side, n): wall - startup for r, case, side, n, wall, startup, *_ in runs}
    cpu = {(r, case, side, n): seconds for r, case, side, n, *_, seconds in runs}
    with_cpu = all(seconds is not None for seconds in cpu.values())
    shape = "tiny GPT-2 (2 x 64)" if args.dry_run else "GPT-2 124M"
    command = "python bench/vs_hf_trainer.py" + (" --dry_run" if args.dry_run else
                                                 f" --rounds={args.rounds} --short={short} --long={long}")
    command += f" --modes={args.modes}" if args.modes != "full,lora" else ""
    stopped = f" (stopped after {len(rounds)} of its {args.rounds} rounds)" if len(rounds) < args.rounds else ""
    lines = [f"### The trainer against Hugging Face's Trainer, {shape} ({time.strftime('%Y-%m-%d')}, {machine()})",
             "", f"`{command}`{stopped}: block {BLOCK}, micro-batch {MICRO}, 1 accumulation step, AdamW, lr {LR} "
             f"constant, dropout 0, one thread per process; {len(rounds)} rounds, median (min to max). ms/iter from the "
             f"difference of {long}- and {short}-iteration runs after their start-ups; start-up from the command to "
             "the first iteration, the trainer's with and without its `deepspeed` launcher's own processes.", "",
             "| mode | dtype | trainer ms/iter | HF Trainer ms/iter | trainer speed ratio (HF ms / trainer ms) "
             "| trainer start-up s | of which launcher s | trainer less launcher s | HF Trainer start-up s |"
             + (" trainer CPU ms/iter | HF Trainer CPU ms/iter | CPU ratio (HF / trainer) |" if with_cpu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if with_cpu else "")]
    for case in cases:
        per_iter = {side: [1000 * (after[(r, case, side, long)] - after[(r, case, side, short)]) / (long - short)
                           for r in rounds] for side in SIDES}
        ratio = [hf / ours for ours, hf in zip(per_iter["trainer"], per_iter["HF Trainer"])]
        ours = [(run[5], run[6]) for run in runs if run[1] == case and run[2] == "trainer"]
        hf = [run[5] for run in runs if run[1] == case and run[2] == "HF Trainer"]
        lines.append(f"| {case[0]} | {case[1]} | {spread(per_iter['trainer'])} | {spread(per_iter['HF Trainer'])} | "
                     f"{spread(ratio, '{:.2f}')} | {spread([s for s, _ in ours], '{:.1f}')} | "
                     f"{spread([la for _, la in ours], '{:.1f}')} | {spread([s - la for s, la in ours], '{:.1f}')} | "
                     f"{spread(hf, '{:.1f}')} |")
        if with_cpu:  # CPU seconds of the long run less the short run's: what another job's load changes least
            per_cpu = {side: [1000 * (cpu[(r, case, side, long)] - cpu[(r, case, side, short)]) / (long - short)
                              for r in rounds] for side in SIDES}
            lines[-1] += (f" {spread(per_cpu['trainer'])} | {spread(per_cpu['HF Trainer'])} | "
                          f"{spread([h / t for t, h in zip(per_cpu['trainer'], per_cpu['HF Trainer'])], '{:.2f}')} |")
    if all(case[1] == "fp32" for case in cases):
        lines += ["", "No bf16 row: this machine has no GPU with bf16 (the CPU path trains in fp32)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
