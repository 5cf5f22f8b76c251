"""One prepared GPU check of the trainer's GPU paths, written to bench/GPU.md as it goes (docs/gpu.md).

    python bench/gpu_check.py                                  # one H100/H200-class GPU, about 12 minutes
    python bench/gpu_check.py --only=speed,packed              # some steps
    python bench/gpu_check.py --dry_run --out=/tmp/GPU.md      # CPU: tiny shapes through every step's code

Each step runs in its own process under its own timeout; its section is appended to the report when it
ends (a step that runs over says so and the next one starts):
  memory   the chosen plan per GPT-2 size under 16, 24 and 40 GB caps, 3 steps on random weights of the
           true shape: predicted against measured allocated and reserved (bench/memory_fit.py's rows)
  speed    GPT-2 124M, full, bf16, block 1024: tokens/s and MFU with compile off and on; gpt2-xl LoRA
  qlora    QLoRA for a few steps: peak against the plan (a memory_fit row with mode=qlora)
  packed   a packed instruction batch: the kernel used (FlexAttention) and its speed against the dense
           mask and against unpacked text of the same shape
  offload  the offload path: DeepSpeed's CPU Adam op built, a few steps (a memory_fit row with offload)
  toolbox  the planner's memory tools (docs/plan.md): gpt2-xl full at 24 GB (adamw8bit, checkpointing),
           gpt2-medium full at 8 GB (adamw8bit, activation offload), QLoRA with paged_adamw8bit, bf16
           gradient accumulation at ZeRO-0, bf16 weights without fp32 masters (bf16_kahan, bf16_sr):
           predicted against measured memory, reserved against allocated, tokens/s (memory_fit rows)
  oom      a real CUDA out-of-memory under a cap: the trainer steps the plan down and finishes the run
  context  the CUDA context (and cuBLAS workspace) outside torch's allocator, measured
  loop     what the training loop adds on a GPU (docs/gpu.md): GPT-2 124M bf16 through the loop's iteration
           against the same engine stepped bare on the same batches; host syncs and pinned copies per
           iteration, counted by torch.profiler
--dry_run: the same steps on the CPU with a tiny GPT-2 (compile, the CUDA context and the real OOM are
replaced by what the CPU can do: eager only, nothing to measure, an injected OOM), for CI.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from dataclasses import replace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from trainer.launcher import use_expandable_segments  # noqa: E402

# as for a training run: every step's process (they inherit it) starts CUDA's allocator with expandable segments
ALLOCATOR = use_expandable_segments()

import memory_fit  # noqa: E402

GiB, MiB = 2**30, 2**20
# (step, seconds it may take on one H100/H200): 12 minutes in all
# (the offload step builds DeepSpeed's CPU Adam op, about a minute on 16 cores; later starts load it cached)
STEPS = {"context": 30, "memory": 150, "speed": 100, "qlora": 40, "packed": 30, "offload": 90, "oom": 40,
         "toolbox": 150, "loop": 60}
# (model, cap in GB, fixed keys) of the toolbox step: the targets of docs/plan.md's table, and each tool forced once
TOOLBOX_ROWS = [("gpt2-xl", 24, {"mode": "full"}), ("gpt2-medium", 8, {"mode": "full"}),
                ("gpt2-xl", 24, {"mode": "qlora", "optimizer": "paged_adamw8bit"}),
                ("gpt2", 16, {"mode": "full", "grad_accum_dtype": "bf16", "zero_stage": 0, "master_weights": "fp32"}),
                ("gpt2-large", 16, {"mode": "full", "activation_offload": True}),
                # bf16 weights without fp32 masters (master_weights): Kahan (torch-optimi), stochastic rounding
                ("gpt2-large", 16, {"mode": "full", "master_weights": "bf16_kahan"}),
                ("gpt2-xl", 24, {"mode": "full", "master_weights": "bf16_sr", "gradient_checkpointing": True}),
                # the step inside the backward (optimizer_in_backward) with optimi's hooks, and with the trainer's
                # over torchao's 4-bit states (adamw4bit): gpt2-xl's 10 GB plan (the ordinary 4-bit step is the
                # memory step's gpt2-xl at 16 GB)
                ("gpt2-xl", 16, {"mode": "full", "master_weights": "bf16_kahan", "optimizer_in_backward": True}),
                ("gpt2-xl", 10, {"mode": "full", "master_weights": "bf16_sr", "optimizer": "adamw4bit",
                                 "optimizer_in_backward": True}),
                # Adam-mini's factored second moments on the bf16 weights (asked for only: docs/plan.md)
                ("gpt2-large", 16, {"mode": "full", "master_weights": "bf16", "optimizer": "adam_mini"})]
CAPS_GB = (16, 24, 40)


# ----------------------------------------------------------------------------- helpers (child side)

def init_single_rank():
    import deepspeed
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(29800 + os.getpid() % 150)))
    deepspeed.init_distributed()


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def char_data(args, tmp):
    """A data_dir with tiny Shakespeare in characters: --data_dir's, or prepared under tmp from the repository's copy."""
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
    if not (data_dir / "shakespeare_char" / "train.bin").is_file():
        subprocess.run([sys.executable, str(REPO / "data/shakespeare_char/prepare.py"), f"--data_dir={data_dir}",
                        f"--input={REPO / 'data/tinyshakespeare.txt'}"], check=True, cwd=REPO, capture_output=True)
    return data_dir


def tiny_or(shape, dry_run):
    return dict(memory_fit.TINY) if dry_run else shape


def timed_steps(engine, batches, steps):
    """(seconds per optimizer step over `steps` after one warm-up, last loss)."""
    seconds, loss = 0.0, None
    for it in range(1 + steps):
        sync()
        start = time.time()
        for args in batches:
            loss = engine(*args)
            engine.backward(loss)
            engine.step()
        loss = loss.item()  # the step's one sync
        sync()
        if it:
            seconds += time.time() - start
    return seconds / steps, loss


# ----------------------------------------------------------------------------- the steps (child side)

def step_context(args):
    import torch
    if not torch.cuda.is_available():
        return {"rows": [["CUDA context", "none on the CPU (dry run)"]]}
    free0, total = torch.cuda.mem_get_info()  # creates the context
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # loads cuBLAS and its workspace
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    from trainer.plan.memory import CUDA_CONTEXT_BYTES
    return {"rows": [["outside torch's allocator after a bf16 matmul", f"{outside / MiB:.0f} MiB"],
                     ["CUDA_CONTEXT_BYTES (trainer/plan/memory.py)", f"{CUDA_CONTEXT_BYTES / MiB:.0f} MiB"]],
            "outside_bytes": outside}


def memory_rows(args, overrides=None, models=None, caps=None):
    ns = SimpleNamespace(steps=args.fit_steps, timeout=args.row_timeout, dry_run=args.dry_run)
    if args.dry_run:
        models, caps = ["tiny"], [2]
    rows = []
    for model in models:
        for cap in caps:
            rows.append(memory_fit.run_one(model, cap, ns, overrides))
            Path(args.partial).write_text(json.dumps({"fit_rows": rows}))  # a timeout keeps the rows so far
    return rows


def step_memory(args):
    return {"fit_rows": memory_rows(args, models=list(memory_fit.MODELS), caps=CAPS_GB)}


def step_qlora(args):
    return {"fit_rows": memory_rows(args, {"mode": "qlora"}, ["gpt2-xl"], [24])}


def step_offload(args):
    return {"fit_rows": memory_rows(args, {"offload": "optimizer", "zero_stage": 2, "mode": "full"}, ["gpt2"], [16])}


def step_toolbox(args):
    rows = []
    for model, cap, keys in TOOLBOX_ROWS:
        if args.dry_run and set(keys) <= {"mode"}:  # the tiny model at 2 GB needs no tool: nothing new to run
            continue
        if args.dry_run:  # the CPU has no CUDA to page with, and accumulates in bf16 only when it trains in bf16
            keys = {**keys, "optimizer": keys.get("optimizer", "auto").replace("paged_", "")}
            keys.update({"dtype": "bf16"} if {"grad_accum_dtype", "master_weights"} & set(keys) else {})
            keys.update({"gradient_checkpointing": True} if keys.get("activation_offload") else {})
        rows += memory_rows(args, keys, [model], [cap])
    return {"fit_rows": rows}


def speed_row(name, shape, mode, compile_model, args, micro, accum):
    """tokens/s and MFU of one configuration, built as the trainer builds it."""
    import torch

    from trainer.config import Config
    from trainer.model.builder import build_module
    from trainer.model.gpt2 import build_model
    from trainer.model.shapes import Shape, flops_per_token
    from trainer.plan.hardware import Hardware, peak_flops
    from trainer.plan.planner import PlanInput, make_plan
    from trainer.run.engine import create_engine

    on_gpu = torch.cuda.is_available() and not args.dry_run
    cfg = Config(**{**shape, "batch_size": micro, "gradient_accumulation_steps": accum, "dropout": 0.0,
                    "lora_dropout": 0.0, "mode": mode, "zero_stage": 0, "offload": "none", "micro_batch_size": micro,
                    "gradient_checkpointing": mode != "full", "compile": compile_model,
                    "dtype": "bf16" if on_gpu else "fp32"})
    vocab = 50257
    hw = Hardware("cuda", 80 * GiB, 1, True, "check") if on_gpu else Hardware("cpu", 8 * GiB, 1, False, "cpu")
    plan = make_plan(PlanInput.of(cfg, Shape(cfg.n_layer, cfg.n_head, cfg.n_embd, vocab,
                                             cfg.block_size)), hw)
    torch.manual_seed(0)
    module = build_module(cfg, plan, build_model(replace(cfg, init_from="scratch"), vocab), "dense_mask")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    engine, _ = create_engine(module, cfg, plan, 1, on_gpu)
    x = torch.randint(0, vocab, (micro, cfg.block_size), device=engine.device)
    per_step, loss = timed_steps(engine, [(x, x)] * accum, args.speed_steps)
    tokens = micro * accum * cfg.block_size / per_step
    fpt = flops_per_token(total, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, mode, trainable)
    peak, why = peak_flops() if on_gpu else (None, "no MFU on the CPU")
    mfu = f"{100 * fpt * tokens / peak:.1f}%" if peak else why
    return [name, f"compile {'on' if compile_model else 'off'}", f"{micro} x {accum}", f"{1000 * per_step:.0f} ms",
            f"{tokens:,.0f}", mfu, f"{loss:.3f}"]


def step_speed(args):
    from trainer.model.shapes import GPT2_SHAPES
    gpt2 = dict(zip(("n_layer", "n_head", "n_embd"), GPT2_SHAPES["gpt2"]), block_size=1024)
    xl = dict(zip(("n_layer", "n_head", "n_embd"), GPT2_SHAPES["gpt2-xl"]), block_size=1024)
    rows = []
    runs = [("gpt2 124M full bf16", gpt2, "full", False, 16, 2), ("gpt2 124M full bf16", gpt2, "full", True, 16, 2),
            ("gpt2-xl LoRA bf16", xl, "lora", True, 8, 1)]
    if args.dry_run:  # compiling on the CPU takes minutes: eager only
        runs = [(name.replace("124M", "tiny").replace("bf16", "fp32"), tiny_or(None, True), mode, False, 2, 1)
                for name, _, mode, *_ in runs[:1] + runs[2:]]
    for name, shape, mode, comp, micro, accum in runs:
        rows.append(speed_row(name, {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, mode,
                              comp, args, micro, accum))
        Path(args.partial).write_text(json.dumps({"rows": rows}))
    return {"rows": rows}


def step_packed(args):
    """Forward and backward of one packed batch: FlexAttention (document mask), the dense mask, plain text."""
    import torch

    from trainer.config import Config
    from trainer.model.attention import packed_kernel
    from trainer.model.gpt2 import build_model
    from trainer.model.loss import LMWithLoss

    on_gpu = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if on_gpu else "cpu"
    shape = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024} if not args.dry_run else \
        {k: memory_fit.TINY[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    cfg = Config(**{**shape, "dropout": 0.0})
    B, T = (8, shape["block_size"]) if on_gpu else (2, shape["block_size"])
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (B, T), generator=gen).to(device)
    lengths = [T // 8, T // 4, T // 2, T - T // 8 - T // 4 - T // 2]  # four examples per row
    pos = torch.cat([torch.arange(n) for n in lengths]).repeat(B, 1).to(device)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    kernel = packed_kernel(device, 0.0)
    for name, packed, positions in (("packed, " + kernel, kernel, pos), ("packed, dense mask (SDPA)", "dense_mask", pos),
                                    ("unpacked text (causal SDPA)", "dense_mask", None)):
        torch.manual_seed(0)
        module = LMWithLoss(build_model(cfg, 50257).to(device=device, dtype=dtype), packed=packed)
        extra = (positions,) if positions is not None else ()
        train = on_gpu  # torch 2.13 has no FlexAttention backward on the CPU
        seconds = 0.0
        for it in range(4):
            sync()
            start = time.time()
            if train:
                module(idx, idx, *extra).backward()
            else:
                with torch.no_grad():
                    module(idx, idx, *extra)
            sync()
            seconds += (time.time() - start) if it else 0.0
        rows.append([name, "forward+backward" if train else "forward (CPU)", f"{1000 * seconds / 3:.1f} ms",
                     f"{B * T * 3 / seconds:,.0f}"])
    return {"rows": rows}


def step_oom(args):
    """A real CUDA OOM: plan for a GPU larger than the process may use, train, and let the step-down act."""
    import torch
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu:  # the CPU has no CUDA OOM: one injected (trainer/run/fault_injection.py reads it when first imported)
        os.environ["GPT2DS_INJECT_OOM"] = "1"

    from trainer.config import resolve_config
    from trainer.run.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = char_data(args, tmp)
        out_dir = Path(tmp) / "out"
        words = ["--recipe", "shakespeare_char_cpu", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                 "--max_iters=6", "--eval_interval=6", "--eval_iters=2", "--log_interval=1", "--tensorboard=False",
                 "--sample_max_new_tokens=0", "--compile=False"]
        hardware = None
        if on_gpu:
            # gpt2 124M shape at block 1024 planned for a 40 GB GPU, run in 6 GB: the plan's micro-batch
            # runs out of memory for real and the step-down must find one that fits
            words += ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=256", "--batch_size=64",
                      "--gradient_accumulation_steps=1", "--dropout=0.0", "--offload=none"]
            torch.cuda.set_per_process_memory_fraction(6 * GiB / torch.cuda.get_device_properties(0).total_memory)
            hardware = {"vram_gb": 40}
        cfg, _ = resolve_config(words)
        result = train(cfg, hardware)
        plan = json.loads((out_dir / "plan.json").read_text())
    history = plan.get("history", [])
    return {"rows": [["iterations done", f"{result['iter_num']} of 6"],
                     ["best val loss", f"{result['best_val_loss']:.4f}"],
                     ["step-downs", "; ".join(f"iteration {h['iteration']}: {h['change']}" for h in history)
                      or "none"]],
            "iter_num": result["iter_num"], "step_downs": len(history)}


def step_loop(args):
    """The loop's own cost on a GPU: ms/iteration of the loop's work (the learning rate, the sampler's batches
    pinned and copied, token weighting, the clip or DeepSpeed's norm, the one host sync, the guard's agreement)
    against the same engine stepped bare on batches already on the GPU, and one iteration's host syncs and
    pinned copies (torch.profiler's CUDA runtime calls)."""
    import math

    import torch

    from trainer.config import resolve_config
    from trainer.optim.schedule import lr_at
    from trainer.run import oom
    from trainer.run.engine import set_lr
    from trainer.run.loop import to_device, train_iteration
    from trainer.run.ranks import agree_any
    from trainer.run.setup import build_run
    on_gpu = torch.cuda.is_available() and not args.dry_run
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = char_data(args, tmp)
        words = ["--recipe", "shakespeare_char_cpu", f"--data_dir={data_dir}", f"--out_dir={Path(tmp) / 'out'}",
                 "--tensorboard=False", "--sample_max_new_tokens=0", "--compile=False", "--dropout=0.0",
                 "--mode=full", "--zero_stage=0", "--offload=none"]
        if on_gpu:  # nanoGPT's GPT-2 124M shape and batch (12 x 1024 per micro-step), two micro-steps
            words += ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--batch_size=12",
                      "--micro_batch_size=12", "--gradient_accumulation_steps=2", "--dtype=bf16"]
        else:
            words += ["--batch_size=2", "--micro_batch_size=2", "--gradient_accumulation_steps=2"]
        cfg, _ = resolve_config(words)
        run = build_run(cfg)
        recovery = oom.Recovery(run)

        def iteration():  # what loop.train does per iteration, less the periodic logging
            set_lr(run.engine, lr_at(run.iter_num, cfg))
            loss, grad_norm = train_iteration(run, recovery)
            run.iter_num += 1
            agree_any([False, not math.isfinite(loss + (grad_norm or 0.0))], run.device)

        steps = max(2, args.speed_steps)
        iteration()  # warm-up
        sync()
        start = time.time()
        for _ in range(steps):
            iteration()
        sync()
        loop_ms = 1000 * (time.time() - start) / steps
        batches = run.sampler.iteration(run.sequences, 0, 1, run.plan.micro_batch_size).batches
        on_device = [tuple(to_device(t, run.device) for t in batch) for batch in batches]
        bare_ms = 1000 * timed_steps(run.engine, on_device, steps)[0]
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            iteration()
        counts = {}
        for event in prof.key_averages():
            counts[event.key] = counts.get(event.key, 0) + event.count
        syncs = sum(n for k, n in counts.items() if k in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                            "cudaEventSynchronize"))
        pinned = counts.get("aten::pin_memory", 0)
        copies = sum(n for k, n in counts.items() if k.startswith("Memcpy HtoD"))
    return {"rows": [["iteration through the loop", f"{loop_ms:.1f} ms"],
                     ["the same engine stepped bare, batches already on the device", f"{bare_ms:.1f} ms"],
                     ["the loop's own cost", f"{loop_ms - bare_ms:+.1f} ms ({100 * (loop_ms / bare_ms - 1):+.1f}%)"],
                     ["host syncs in one iteration (cuda*Synchronize calls)", str(syncs)],
                     ["pinned batch tensors / host-to-device copies in one iteration", f"{pinned} / {copies}"],
                     ["micro-steps per iteration", str(run.plan.grad_accum_per_rank)]]}


def child(args):
    if args.step in ("speed", "oom", "loop"):  # the steps that build engines here (memory_fit rows start their own)
        init_single_rank()
    out = globals()[f"step_{args.step}"](args)
    Path(args.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- orchestration

def machine(dry_run):
    import torch
    lines = [f"- host: {platform.node() or '?'}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}"]
    if torch.cuda.is_available() and not dry_run:
        p = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown (nvidia-smi failed)"
        lines.append(f"- GPU: {p.name}, {p.total_memory / GiB:.1f} GiB, compute capability {p.major}.{p.minor}, "
                     f"driver {driver}")
    else:
        lines.append("- GPU: none (DRY RUN on the CPU: code paths only, no GPU numbers)")
    versions = []
    for name in ("torch", "deepspeed", "transformers", "peft", "bitsandbytes"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001 - a missing package is reported as missing
            versions.append(f"{name} MISSING")
    lines.append(f"- {', '.join(versions)}; CUDA {torch.version.cuda}")
    lines.append(f"- CUDA allocator: {ALLOCATOR} (every memory row gives max reserved against max allocated)")
    return "\n".join(lines)


def section(step, out, seconds, status):
    lines = [f"\n## {step} ({status}, {seconds:.0f} s)\n"]
    if out.get("fit_rows"):
        lines.append(memory_fit.table(out["fit_rows"]))
        lines.append("")
        lines.append(memory_fit.summary(out["fit_rows"]))
    heads = {"speed": ["run", "compile", "micro x accum", "per step", "tokens/s", "MFU", "loss"],
             "packed": ["batch", "pass", "time", "tokens/s"]}
    if out.get("rows"):
        head = heads.get(step, ["what", "value"])
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in out["rows"]]
    if out.get("error"):
        lines.append(f"error: {out['error']}")
    return "\n".join(lines) + "\n"


def run_step(step, args, out_path):
    budget = STEPS[step] * args.time_scale
    with tempfile.TemporaryDirectory() as tmp:
        result, partial = Path(tmp) / "out.json", Path(tmp) / "partial.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"--step={step}", f"--result={result}",
               f"--partial={partial}", f"--row_timeout={args.row_timeout}", f"--fit_steps={args.fit_steps}",
               f"--speed_steps={args.speed_steps}"]
        cmd += (["--dry_run"] if args.dry_run else []) + ([f"--data_dir={args.data_dir}"] if args.data_dir else [])
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget)
            status = "ok" if result.is_file() else "failed"
            out = json.loads(result.read_text()) if result.is_file() else {}
            if status == "failed":
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                out["error"] = " / ".join(tail)[-600:]
        except subprocess.TimeoutExpired:
            status = f"timeout after {budget:.0f} s"
            out = json.loads(partial.read_text()) if partial.is_file() else {}
    with open(out_path, "a") as f:
        f.write(section(step, out, time.time() - start, status))
    print(f"{step}: {status} ({time.time() - start:.0f} s)", flush=True)
    return status, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench/GPU.md"))
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)}")
    ap.add_argument("--data_dir", default="", help="where data/shakespeare_char was prepared (else a temporary one)")
    ap.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes: the code paths only")
    ap.add_argument("--time_scale", type=float, default=1.0, help="multiply every step's time limit")
    ap.add_argument("--row_timeout", type=int, default=60, help="seconds per memory_fit row")
    ap.add_argument("--fit_steps", type=int, default=3)
    ap.add_argument("--speed_steps", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--partial", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    steps = [s for s in args.only.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: unknown step {', '.join(unknown)}; choose from {', '.join(STEPS)}", file=sys.stderr)
        sys.exit(2)
    import torch
    if args.dry_run:
        if Path(args.out).resolve() == (REPO / "bench/GPU.md").resolve():
            print("error: --dry_run needs its own --out (bench/GPU.md holds GPU measurements only)", file=sys.stderr)
            sys.exit(2)
    elif not torch.cuda.is_available():
        print("error: no GPU: bench/gpu_check.py measures a GPU; --dry_run --out=/tmp/GPU.md runs its code paths "
              "on the CPU", file=sys.stderr)
        sys.exit(2)
    title = "GPU check" + (" (DRY RUN on the CPU: code paths only, no GPU numbers)" if args.dry_run else "")
    Path(args.out).write_text(f"# {title}\n\n`python bench/gpu_check.py {' '.join(sys.argv[1:])}`, "
                              f"{datetime.datetime.now().isoformat(timespec='minutes')}\n\n{machine(args.dry_run)}\n")
    results = {step: run_step(step, args, args.out)[0] for step in steps}
    failed = [s for s, status in results.items() if status != "ok"]
    print(f"wrote {args.out}; " + (f"not ok: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    from trainer.cli import exit_quickly
    exit_quickly(main())
