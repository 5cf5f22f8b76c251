"""Benchmark: peak memory and seconds per iteration of full vs LoRA vs QLoRA, with the plan's prediction.

    python bench/modes_memory.py                        # CPU: GPT-2 124M shape, block 256
    python bench/modes_memory.py --device=cuda          # GPU: all four GPT-2 sizes, block 1024
    python bench/modes_memory.py --sizes=gpt2-xl --modes=lora,qlora --iters=6   # a subset

For each size a GPT-2 of that shape with random weights is saved in Hugging Face format (no download:
the weights' values do not change memory or speed), and each mode trains it for a few iterations with
the documented command, `python launch/train.py --init_from=<that dir> --mode=<mode> ...`, each in its
own process so that each peak is its own. Measured:
- peak memory: on GPUs torch.cuda.max_memory_allocated (the trainer's `mem/peak_bytes` TensorBoard
  scalar); on the CPU the peak resident memory (VmRSS, polled from /proc) from the first evaluation on,
  i.e. while training, beside the process's lifetime peak that the trainer logs (which includes loading);
- s/iter: the mean of the trainer's per-iteration times, the first iteration left out (warm-up); and the
  process's CPU seconds (user + system, all threads) per iteration over the same iterations, which other
  processes sharing the cores inflate far less than the wall time;
- checkpoint: the size of the checkpoint the run saves at its last iteration;
beside the plan's predicted peak (plan.json: `allocated_bytes` on GPUs, comparable with
max_memory_allocated, and `total_bytes`, which adds the allocator's fragmentation and the CUDA context;
on the CPU `total_bytes`, which counts the Python process itself).
The table is printed and appended to --results with the command and the machine.
"""
import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tables import publish  # noqa: E402
from trainer.units import MiB, format_bytes  # noqa: E402

SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
SIZES = {"tiny": (2, 2, 64), "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
         "gpt2-xl": (48, 25, 1600)}  # tiny: for the benchmark's own test
DEFAULTS = {  # device -> sizes, block_size, batch_size, iters
    "cpu": ("gpt2", 256, 2, 4),
    "cuda": ("gpt2,gpt2-medium,gpt2-large,gpt2-xl", 1024, 4, 8),
}

def fmt(n):
    return "" if n is None else format_bytes(n)


def prepare_data(data_dir):
    """tiny Shakespeare in GPT-2 BPE under data_dir/shakespeare (kept if already there)."""
    if (Path(data_dir) / "shakespeare" / "train.bin").is_file():
        return
    args = [sys.executable, str(REPO / "data/shakespeare/prepare.py"), f"--data_dir={data_dir}"]
    if SHAKESPEARE.is_file():
        args.append(f"--input={SHAKESPEARE}")
    subprocess.run(args, check=True, cwd=REPO, capture_output=True)


def random_model(size, folder):
    """A GPT-2 of this size's shape with random weights, in Hugging Face format."""
    if (Path(folder) / "config.json").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd = SIZES[size]
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).save_pretrained(folder)
    return folder


def train_command(model_dir, data_dir, out_dir, mode, block_size, batch_size, iters):
    return [sys.executable, str(REPO / "launch/train.py"), f"--init_from={model_dir}", "--dataset=shakespeare",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--mode={mode}", f"--block_size={block_size}",
            f"--batch_size={batch_size}", "--gradient_accumulation_steps=1", f"--max_iters={iters}",
            f"--eval_interval={iters}", "--eval_iters=1", "--log_interval=1", "--warmup_iters=0",
            "--learning_rate=1e-4", "--decay_lr=False", "--always_save_checkpoint=True", "--tensorboard=True",
            "--sample_max_new_tokens=0", "--overwrite=True"]


def peak_bytes(out_dir):
    """The largest mem/peak_bytes the trainer logged (exact bytes, unlike the console's rounding)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return int(max(e.value for e in acc.Scalars("mem/peak_bytes")))


def checkpoint_bytes(out_dir):
    root = Path(out_dir) / "checkpoints"
    tag = (root / "latest").read_text().strip()
    return sum(p.stat().st_size for p in (root / tag).rglob("*") if p.is_file())


def resident_bytes(pid):
    """VmRSS: what `top` shows, anonymous memory plus mapped file pages.

    Both count: transformers maps the weights' safetensors file and a model loaded in the file's dtype
    computes straight from those pages (so LoRA's fp32 base is file pages, not anonymous memory), and a
    4-bit load keeps the file mapped through the embeddings it uses from it.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def run_watching_rss(cmd, env):
    """Run the trainer; returns (returncode, stdout, stderr, peak RSS from its first evaluation on,
    CPU seconds per iteration).

    The process's lifetime peak includes loading the weights, which for QLoRA means fp32 tensors on their
    way to 4 bits; polling /proc from the first `step 0:` line (model built, engine created) gives the
    peak of training itself.
    """
    import psutil
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        state = {"training": False, "peak": 0, "done": False}

        def poll():
            while not state["done"]:
                try:
                    rss = resident_bytes(proc.pid)
                except OSError:
                    break
                if state["training"]:
                    state["peak"] = max(state["peak"], rss)
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        lines, cpu = [], {}  # iteration -> CPU seconds the process had used when it printed that line
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 0:"):
                state["training"] = True
            m = re.match(r"iter (\d+)/", line)
            if m:
                try:
                    times = psutil.Process(proc.pid).cpu_times()
                    cpu[int(m[1])] = times.user + times.system
                except psutil.Error:
                    pass
        proc.wait()
        state["done"] = True
        poller.join()
        err.seek(0)
        cpu_per_iter = (cpu[max(cpu)] - cpu[min(cpu)]) / (max(cpu) - min(cpu)) if len(cpu) > 1 else None
        return proc.returncode, "".join(lines), err.read(), state["peak"] or None, cpu_per_iter


def measure(size, mode, model_dir, data_dir, work, block_size, batch_size, iters, device):
    """One mode of one size in its own process; a row of the table (or the error it ended with)."""
    out_dir = Path(work) / f"out-{size}-{mode}"
    cmd = train_command(model_dir, data_dir, out_dir, mode, block_size, batch_size, iters)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so the fp32 weights
        # QLoRA quantizes while loading would stay in RSS: a fixed 1 MiB threshold returns them.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MiB))
    code, stdout, stderr, training_rss, cpu_per_iter = run_watching_rss(cmd, env)
    row = {"size": size, "mode": mode}
    if code != 0:
        errors = [line for line in stderr.splitlines() if line.startswith(("error:", "torch.OutOfMemoryError"))]
        row["error"] = errors[-1] if errors else f"exit {code}: {stderr.strip().splitlines()[-1:]}"
        return row
    plan = json.loads((out_dir / "plan.json").read_text())
    ms = [float(v) for v in re.findall(r"^iter \d+/\d+: .*?, ([\d.]+)ms/iter", stdout, re.M)]
    timed = ms[1:] or ms
    row.update(peak=peak_bytes(out_dir), training_rss=training_rss if device == "cpu" else None,
               s_per_iter=sum(timed) / len(timed) / 1000, cpu_s_per_iter=cpu_per_iter,
               checkpoint=checkpoint_bytes(out_dir), predicted_total=plan["total_bytes"],
               predicted_allocated=plan["allocated_bytes"], trainable=plan["params_trainable"],
               total=plan["params_total"],
               plan=f"ZeRO-{plan['zero_stage']}{', ckpt' if plan['gradient_checkpointing'] else ''}, "
                    f"micro {plan['micro_batch_size']}"
                    f"{', offload ' + plan['offload'] if plan['offload'] != 'none' else ''}")
    shutil.rmtree(out_dir / "checkpoints")  # a full gpt2-xl checkpoint is tens of GB
    return row


def table(rows, device, command, machine, block_size, batch_size, iters):
    gpu = device == "cuda"
    title = (f"\n### full vs LoRA vs QLoRA, random-weight GPT-2 shapes, block {block_size}, batch {batch_size}, "
             f"{iters} iterations ({time.strftime('%Y-%m-%d')}, {machine})\n\n`{command}`\n\n")
    measured = "peak max_memory_allocated" if gpu else "peak RSS while training / of the whole run"
    head = (f"| size | mode | plan | trainable / total | {measured} | plan: predicted "
            f"{'allocated / total' if gpu else 'total'} | s/iter | CPU s/iter | checkpoint |\n"
            f"|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | {r['error']} | | | | | | |")
            continue
        predicted = (f"{fmt(r['predicted_allocated'])} / {fmt(r['predicted_total'])}" if gpu
                     else fmt(r["predicted_total"]))
        share = f"{r['trainable'] / 1e6:.2f}M / {r['total'] / 1e6:.2f}M ({100 * r['trainable'] / r['total']:.2f}%)"
        peak = fmt(r["peak"]) if gpu else f"{fmt(r['training_rss'])} / {fmt(r['peak'])}"
        cpu_s = "" if r.get("cpu_s_per_iter") is None else f"{r['cpu_s_per_iter']:.2f}"
        lines.append(f"| {r['size']} | {r['mode']} | {r['plan']} | {share} | {peak} | {predicted} | "
                     f"{r['s_per_iter']:.2f} | {cpu_s} | {fmt(r['checkpoint'])} |")
    return title + head + "\n".join(lines) + "\n"


def machine_name(device):
    import torch
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # other processes share the cores: s/iter depends on it
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load} at the "
            f"start, torch {torch.__version__}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sizes", default=None, help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--modes", default="full,lora,qlora")
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--data_dir", default=None, help="a data_dir with shakespeare/ prepared (default: a temporary one)")
    p.add_argument("--work_dir", default=None, help="where models and runs go (default: a temporary folder)")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes, block_size, batch_size, iters = DEFAULTS[device]
    sizes = (args.sizes or sizes).split(",")
    block_size, batch_size, iters = args.block_size or block_size, args.batch_size or batch_size, args.iters or iters
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"error: unknown size {unknown[0]}; choose from {', '.join(SIZES)}")
    machine = machine_name(device)
    command = "python bench/modes_memory.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_dir = args.data_dir or str(work / "data")
        prepare_data(data_dir)
        rows = []
        for size in sizes:
            model_dir = random_model(size, work / f"model-{size}")
            for mode in args.modes.split(","):
                row = measure(size, mode, model_dir, data_dir, work, block_size, batch_size, iters, device)
                print(json.dumps(row), flush=True)
                rows.append(row)
    text = table(rows, device, command.strip(), machine, block_size, batch_size, iters)
    publish(text.strip("\n"), args.results)
    return rows


if __name__ == "__main__":
    main()
