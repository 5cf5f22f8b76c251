"""Benchmark: the planner's predicted peak against real GPU memory, per GPT-2 size and memory cap.

    python bench/memory_fit.py                                   # 4 sizes x 8, 12, 16, 24, 40 GB -> bench/MEMORY.md
    python bench/memory_fit.py --models=gpt2-xl --caps=8,24      # a subset; rows merge into bench/memory_fit.json
    python bench/memory_fit.py --dry_run --out=/tmp/MEMORY.md    # CPU: a tiny GPT-2 through every code path

Each (size, cap) runs in its own process, so each peak is its own: the process caps itself with
torch.cuda.set_per_process_memory_fraction(cap / GPU memory), plans for a GPU of `cap` GB
(trainer/plan/planner.make_plan, the recipe gpt2_small/medium/large/xl on top of the defaults, as
`--vram_gb=cap` would), builds the model of the true shape with random weights (QLoRA: saved and
reloaded in 4 bits, as from a checkpoint), the engine exactly as the trainer does (trainer/model/builder.py,
trainer/run/engine.py), and runs one warm-up and `--steps` timed iterations of random tokens.
Recorded beside the prediction (plan.estimate.allocated, and allocated x (1 + FRAGMENTATION) for the
allocator's reserve):
- torch.cuda.max_memory_allocated and max_memory_reserved over the iterations (reset after the
  engine is built; the first iteration creates Adam's states, so they are in the peak);
- the memory outside torch's allocator (CUDA context, cuBLAS/NCCL workspaces): the device's used
  memory (cudaMemGetInfo) less torch's reserve, next to CUDA_CONTEXT_BYTES;
- tokens per second of the timed iterations; an out-of-memory error as "OOM".
Targets (issue 3): no chosen plan runs out of memory; |predicted - measured| <= 10% of measured.
Results accumulate in bench/memory_fit.json (one row per size and cap, the latest run wins) and
bench/MEMORY.md is written from all of them, with the machine. The end of the output suggests
the calibrated constants of trainer/plan/memory.py (FRAGMENTATION, CUDA_CONTEXT_BYTES).
With --dry_run (no GPU needed) a 2-layer GPT-2 plans against CPU budgets and runs 1 step on the
CPU; the memory columns stay empty (no allocator statistics on the CPU).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import replace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

from plan_table import RECIPES, recipe_cfg  # noqa: E402
from trainer.model.shapes import GPT2_VOCAB, Shape  # noqa: E402
from trainer.plan import memory as mm  # noqa: E402  (pure arithmetic: no torch at import)
from trainer.units import format_bytes  # noqa: E402

MODELS = tuple(RECIPES)
CAPS_GB = (8, 12, 16, 24, 40)
# --dry_run's model and batch: short blocks, since on a CPU without bf16 instructions the bf16 rows' time is
# their logits' matmul (8 sequences x 50257 words)
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 16, "batch_size": 4,
        "gradient_accumulation_steps": 2}
DRY_CAPS_GB = (1, 2)  # --dry_run: CPU budgets
TARGET = 0.10
GiB, MiB = 2**30, 2**20


def fmt(n):
    return "" if n is None else format_bytes(n)


def pct(predicted, measured):
    return None if not measured or predicted is None else 100.0 * (predicted - measured) / measured


# ----------------------------------------------------------------------------- one run (child process)

def run_cfg(model, dry_run, overrides=None):
    """(config, shape): the recipe's config with the model's true shape, as bench/plan_table.py plans it
    (plus overrides: bench/gpu_check.py fixes the mode or the offload this way)."""
    if dry_run:
        from trainer.config import Config
        cfg = Config(**{**TINY, "dropout": 0.0, "lora_dropout": 0.0})
        shape = Shape(TINY["n_layer"], TINY["n_head"], TINY["n_embd"], GPT2_VOCAB, TINY["block_size"])
    else:
        cfg, shape = recipe_cfg(model)
    return replace(cfg, **(overrides or {})), shape


def build_module(cfg, shape, plan, device_type, workdir):
    """The model of the plan's mode as the trainer builds it (trainer/model/builder.py), with random weights
    of the true shape in place of downloaded ones."""
    import torch
    from transformers import GPT2LMHeadModel

    from trainer.model.adapters import build_base
    from trainer.model.attention import packed_kernel
    from trainer.model.builder import build_module as build_trained
    from trainer.model.gpt2 import gpt2_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(shape, cfg.dropout))
    if plan.mode == "qlora":  # the 4-bit base comes from a checkpoint on disk, as from the hub
        source = Path(workdir) / "random-gpt2"
        model.save_pretrained(source)
        del model
        model = build_base(replace(cfg, init_from=str(source)), shape.vocab_size, "qlora", plan.dtype, device_type)
    return build_trained(cfg, plan, model, packed_kernel(device_type, cfg.dropout))


def child(args):
    """Plan, build and run one (size, cap); write its row as JSON to args.result."""
    import torch

    from trainer.plan.hardware import Hardware
    from trainer.plan.planner import PlanError, PlanInput, make_plan
    from trainer.plan.report import plan_to_dict

    on_gpu = torch.cuda.is_available() and not args.dry_run
    cap = int(args.cap_gb * GiB)
    row = {"model": args.model, "cap_gb": args.cap_gb}
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        if cap > props.total_memory:
            row.update(status="skipped", error=f"the GPU has only {fmt(props.total_memory)}")
            Path(args.result).write_text(json.dumps(row))
            return
        torch.cuda.set_per_process_memory_fraction(cap / props.total_memory)
        hw = Hardware("cuda", cap, 1, torch.cuda.get_device_capability(0) >= (8, 0),
                      f"{props.name} capped at {args.cap_gb:g} GB")
    else:
        hw = Hardware("cpu", cap, 1, False, f"CPU budget {args.cap_gb:g} GB (dry run)")
    cfg, shape = run_cfg(args.model, args.dry_run, json.loads(args.override))
    try:
        plan = make_plan(PlanInput.of(cfg, shape), hw)
    except PlanError as exc:
        row.update(status="does not fit", error=str(exc))
        Path(args.result).write_text(json.dumps(row))
        return
    row.update(plan={k: v for k, v in plan_to_dict(plan).items() if k != "reasons"},
               predicted_allocated=plan.estimate.allocated,
               predicted_reserved=int(plan.estimate.allocated * (1 + mm.FRAGMENTATION)) if on_gpu else None,
               predicted_outside=mm.CUDA_CONTEXT_BYTES if on_gpu else None, predicted_total=plan.estimate.total)

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(29700 + os.getpid() % 200)))
    import deepspeed
    deepspeed.init_distributed()
    from trainer.run.engine import create_engine

    status = "ok"
    try:
        with tempfile.TemporaryDirectory() as workdir:
            module = build_module(cfg, shape, plan, hw.device_type, workdir)
        engine, _ = create_engine(module, cfg, plan, 1, on_gpu)
        device = engine.device
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(0)
        micro, accum, block = plan.micro_batch_size, plan.grad_accum_per_rank, cfg.block_size
        seconds = 0.0
        for it in range(1 + args.steps):  # iteration 0 is the warm-up
            start = time.time()
            for _ in range(accum):
                x = torch.randint(0, shape.vocab_size, (micro, block), generator=gen).to(device)
                loss = engine(x, x)
                engine.backward(loss)
                engine.step()
            if on_gpu:
                torch.cuda.synchronize()
            if it > 0:
                seconds += time.time() - start
        row["tokens_per_sec"] = args.steps * plan.tokens_per_iteration / seconds
        if on_gpu:
            free, total = torch.cuda.mem_get_info()
            row.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved(),
                       outside=total - free - torch.cuda.memory_reserved())
    except torch.OutOfMemoryError as exc:
        status = "OOM"
        row["error"] = str(exc).splitlines()[0][:300]
        if on_gpu:
            row.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
    row["status"] = status
    Path(args.result).write_text(json.dumps(row))


# ----------------------------------------------------------------------------- orchestration

def machine(dry_run):
    import torch
    versions = []
    for name in ("torch", "deepspeed", "transformers", "peft", "bitsandbytes"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception:  # a missing optional package is just not listed
            pass
    if torch.cuda.is_available() and not dry_run:
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / GiB:.1f} GiB, CUDA {torch.version.cuda}"
    else:
        gpu = "no GPU (dry run on the CPU)"
    return f"{gpu}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {', '.join(versions)}"


def run_one(model, cap, args, overrides=None):
    """One (size, cap) row from its own process; a row that runs past args.timeout says so."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"--model={model}", f"--cap_gb={cap}",
               f"--steps={args.steps}", f"--result={result}", f"--override={json.dumps(overrides or {})}"]
        cmd += ["--dry_run"] if args.dry_run else []
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"model": model, "cap_gb": cap, "status": "timeout", "error": f"over {args.timeout} s"}
        if not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"model": model, "cap_gb": cap, "status": "failed", "error": tail[0][:300]}
        row = json.loads(result.read_text())
        row["wall_s"] = round(time.time() - start, 1)
        return row


def table(rows):
    head = ["model", "cap", "plan (mode, ZeRO, offload, ckpt, micro x accum, tools)", "predicted allocated",
            "max allocated", "diff", "predicted reserved", "max reserved", "diff", "outside torch (pred / meas)",
            "tokens/s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r.get("plan")
        desc = (f"{p['mode']}, {p['zero_stage']}, {p['offload']}, {'on' if p['gradient_checkpointing'] else 'off'}, "
                f"{p['micro_batch_size']} x {p['grad_accum_per_rank']}"
                + (f", {p['optimizer']}" if p.get("optimizer", "adamw") != "adamw" else "")
                + (f", {p['master_weights']} weights" if p.get("master_weights", "fp32") != "fp32" else
                   ", accum bf16" if p.get("grad_accum_dtype") == "bf16" and p.get("dtype") == "bf16" else "")
                + (", in backward" if p.get("optimizer_in_backward") else "")
                + (", act. offload" if p.get("activation_offload") else "")) if p else r.get("error", "")[:120]
        d_alloc, d_res = pct(r.get("predicted_allocated"), r.get("allocated")), pct(r.get("predicted_reserved"),
                                                                                    r.get("reserved"))
        cells = [r["model"], f"{r['cap_gb']:g} GB", desc, fmt(r.get("predicted_allocated")), fmt(r.get("allocated")),
                 "" if d_alloc is None else f"{d_alloc:+.1f}%", fmt(r.get("predicted_reserved")),
                 fmt(r.get("reserved")), "" if d_res is None else f"{d_res:+.1f}%",
                 f"{fmt(r.get('predicted_outside'))} / {fmt(r.get('outside'))}" if r.get("outside") else "",
                 f"{r['tokens_per_sec']:,.0f}" if r.get("tokens_per_sec") else "", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows):
    """Targets met or not, and the constants the measurements suggest."""
    ran = [r for r in rows if r.get("allocated")]
    ooms = [f"{r['model']} at {r['cap_gb']:g} GB" for r in rows if r["status"] == "OOM"]
    lines = [f"- out of memory: {', '.join(ooms) if ooms else 'none'}"]
    if ran:
        worst = max(ran, key=lambda r: abs(pct(r["predicted_allocated"], r["allocated"])))
        within = sum(abs(pct(r["predicted_allocated"], r["allocated"])) <= 100 * TARGET for r in ran)
        lines.append(f"- predicted allocated within {TARGET:.0%} of measured: {within} of {len(ran)} rows "
                     f"(worst {worst['model']} at {worst['cap_gb']:g} GB: "
                     f"{pct(worst['predicted_allocated'], worst['allocated']):+.1f}%)")
        frag = statistics.median(r["reserved"] / r["allocated"] - 1 for r in ran)
        lines.append(f"- suggested FRAGMENTATION = {frag:.3f} (median reserved / allocated - 1; "
                     f"now {mm.FRAGMENTATION})")
        outside = [r["outside"] for r in ran if r.get("outside")]
        if outside:
            lines.append(f"- suggested CUDA_CONTEXT_BYTES = {statistics.median(outside) / MiB:.0f} MiB (median memory "
                         f"outside torch's allocator; now {mm.CUDA_CONTEXT_BYTES / MiB:.0f} MiB)")
    return "\n".join(lines)


def write_report(rows, out, command, dry_run):
    order = {m: i for i, m in enumerate(MODELS + ("tiny",))}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], 99), r["cap_gb"]))
    text = (f"# Memory fit: predicted vs measured peak per GPT-2 size and memory cap\n\n"
            f"`{command}` on {machine(dry_run)}, {datetime.date.today().isoformat()}.\n\n"
            f"Each row: the plan trainer/plan/planner.py chooses for a GPU of that size (recipe gpt2_small/medium/large/xl, "
            f"block 1024), run for a few iterations in a process capped with "
            f"torch.cuda.set_per_process_memory_fraction. Predicted allocated is plan.json's `allocated_bytes` "
            f"(compare torch.cuda.max_memory_allocated); predicted reserved adds FRAGMENTATION.\n\n"
            f"{table(rows)}\n\n{summary(rows)}\n")
    if dry_run:
        text = text.replace("# Memory fit:", "# Memory fit (DRY RUN on the CPU: code paths only, no GPU numbers):")
    Path(out).write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--caps", default=",".join(map(str, CAPS_GB)), help="memory caps in GB (GiB, as nvidia-smi)")
    ap.add_argument("--steps", type=int, default=3, help="timed iterations after one warm-up")
    ap.add_argument("--results", default=str(REPO / "bench/memory_fit.json"))
    ap.add_argument("--out", default=str(REPO / "bench/MEMORY.md"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (size, cap)")
    ap.add_argument("--dry_run", action="store_true", help="CPU, a tiny GPT-2, CPU budgets: the code paths only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--cap_gb", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--override", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch
    if args.dry_run:
        models, caps = ["tiny"], list(DRY_CAPS_GB)
        if args.out == str(REPO / "bench/MEMORY.md") or args.results == str(REPO / "bench/memory_fit.json"):
            sys.exit("--dry_run needs its own --out and --results (bench/MEMORY.md holds GPU measurements only)")
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: bench/memory_fit.py measures GPU memory; --dry_run runs its code paths on the CPU")
        models, caps = args.models.split(","), [float(c) for c in args.caps.split(",")]
    results = Path(args.results)
    rows = {(r["model"], r["cap_gb"]): r for r in (json.loads(results.read_text()) if results.is_file() else [])}
    for model in models:
        for cap in caps:
            row = run_one(model, cap, args)
            rows[(model, cap)] = row
            print(f"{model} {cap:g} GB: {row['status']}, predicted {fmt(row.get('predicted_allocated'))}, "
                  f"measured {fmt(row.get('allocated'))}", flush=True)
            results.write_text(json.dumps(list(rows.values()), indent=1))  # after each row: a timeout loses one
    command = "python bench/memory_fit.py " + " ".join(sys.argv[1:])
    print(write_report(list(rows.values()), args.out, command.strip(), args.dry_run))


if __name__ == "__main__":
    from trainer.cli import exit_quickly
    exit_quickly(main())
