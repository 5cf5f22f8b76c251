"""Benchmark: what each memory tool costs in time on this CPU, the constants of trainer/plan/cost.py.

    python bench/step_costs.py [--block_size=128] [--iters=3] [--rounds=2] [--results=FILE]

One process builds, one after another, the engine the trainer builds (trainer/model/builder.py,
trainer/run/engine.py) for each variant of a GPT-2 124M shape with random weights saved in Hugging Face
format (QLoRA loads it in 4 bits as a run does), and times iterations of it on random tokens: forward,
backward and optimizer step. Every variant trains the same tokens per iteration (2 sequences):

  full          ZeRO-0, micro-batch 2, AdamW (the plain plan of trainer/plan/cost.py)
  full_micro1   the same tokens in 2 micro-steps of 1: what a micro-step costs, fixed and per trained parameter
  full_ckpt     with gradient checkpointing
  full_8bit     bitsandbytes' AdamW8bit
  lora, qlora   r=8 on c_attn (the recipes' default); lora_micro1 in 2 micro-steps: the fixed cost alone
  bf16          bf16 training with fp32 masters (DeepSpeed's BF16_Optimizer), the baseline of the four below
  bf16_kahan, bf16_sr, bf16_sr_4bit
                bf16 weights without fp32 masters: torch-optimi's Kahan-summed AdamW, torchao's AdamW with
                stochastic rounding, torchao's AdamW4bit on bf16_sr (master_weights, optimizer=adamw4bit)
  bf16_kahan_release
                the step inside the backward (optimizer_in_backward): its step is part of the passes' time
  full_adam_mini, bf16_adam_mini
                Adam-mini's factored second moments (optimizer=adam_mini) on fp32 weights, and on plain bf16
                weights (master_weights=bf16)

The variants alternate (--rounds), so that drift in the machine's load spreads over all of them. Times are
the process's CPU seconds with torch on one thread (time.process_time): other processes sharing the cores
change them far less than wall time. The first iteration of each engine is left out (warm-up), and the
least of the others is taken (load on a shared machine only ever adds time). Derived:
each variant's time / full's; the micro-step's fixed seconds; GPT-2 training FLOP/s of one core
(flops_per_token x tokens / full's seconds). The table is printed and appended to --results.
"""
import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tables import publish  # noqa: E402

VARIANTS = {
    "full": {},
    "full_micro1": {"micro_batch_size": 1},
    "full_ckpt": {"gradient_checkpointing": True},
    "full_8bit": {"optimizer": "adamw8bit"},
    "lora": {"mode": "lora"},
    "lora_micro1": {"mode": "lora", "micro_batch_size": 1},
    "qlora": {"mode": "qlora"},
    # bf16 training: fp32 masters (BF16_Optimizer) against the tools that keep none (trainer/optim/optimizer.py)
    "bf16": {"dtype": "bf16"},
    "bf16_kahan": {"dtype": "bf16", "master_weights": "bf16_kahan"},
    "bf16_sr": {"dtype": "bf16", "master_weights": "bf16_sr"},
    "bf16_sr_4bit": {"dtype": "bf16", "master_weights": "bf16_sr", "optimizer": "adamw4bit"},
    "bf16_kahan_release": {"dtype": "bf16", "master_weights": "bf16_kahan", "optimizer_in_backward": True},
    # Adam-mini's factored second moments: on fp32 weights (against full), on plain bf16 weights (against bf16)
    "full_adam_mini": {"optimizer": "adam_mini"},
    "bf16_adam_mini": {"dtype": "bf16", "master_weights": "bf16", "optimizer": "adam_mini"},
}
SEQUENCES = 2  # per iteration


def random_gpt2(folder):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    return folder


def time_variant(name, model_dir, block_size, iters):
    """CPU seconds of each timed iteration of this variant: (forward and backward passes, optimizer step)."""
    import torch
    from trainer.config import Config
    from trainer.model.shapes import model_shape
    from trainer.plan.hardware import detect_hardware
    from trainer.plan.planner import PlanInput, make_plan
    from trainer.run.engine import create_engine
    from trainer.run.setup import build_trained_module
    cfg = Config(**{"init_from": str(model_dir), "block_size": block_size, "dropout": 0.0, "mode": "full",
                    "zero_stage": 0, "offload": "none", "micro_batch_size": SEQUENCES, "gradient_checkpointing": False,
                    "optimizer": "adamw", "batch_size": SEQUENCES, "gradient_accumulation_steps": 1,
                    "lora_dropout": 0.0, "compile": False, **VARIANTS[name]})
    shape = model_shape(cfg, 50257)
    plan = make_plan(PlanInput.of(cfg, shape), detect_hardware(1))
    module = build_trained_module(cfg, plan, shape.vocab_size, "cpu")
    engine, _ = create_engine(module, cfg, plan, 1, False)
    gen = torch.Generator().manual_seed(0)
    micro, accum = plan.micro_batch_size, plan.grad_accum_per_rank  # batch_size sequences per iteration
    x = torch.randint(0, shape.vocab_size, (micro, block_size), generator=gen)
    y = torch.randint(0, shape.vocab_size, (micro, block_size), generator=gen)
    engine.train()  # from_pretrained leaves the model in eval mode, where checkpointing does nothing
    passes, steps = [], []
    for it in range(iters + 1):
        start = time.process_time()
        for _ in range(accum - 1):
            engine.backward(engine(x, y))
            engine.step()  # not at the boundary: only DeepSpeed's bookkeeping
        engine.backward(engine(x, y))
        stepping = time.process_time()
        engine.step()
        if it:  # the first iteration warms up
            passes.append(stepping - start)
            steps.append(time.process_time() - stepping)
    engine.destroy()
    del engine, module
    gc.collect()
    return passes, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per variant and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--work_dir", default=None, help="keep the random GPT-2 here (default: a temporary folder)")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29731"))
    import deepspeed
    import torch
    from trainer.config import DEFAULTS
    from trainer.model.shapes import Shape, flops_per_token, recompute_flops_per_token
    from trainer.plan.memory import parameter_counts
    from trainer.run.ranks import release_cpu_allreduce_buffer
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    release_cpu_allreduce_buffer()
    load = os.getloadavg()
    started = time.time()
    names = args.only.split(",")
    passes, steps = {n: [] for n in names}, {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_gpt2(Path(args.work_dir or tmp) / "gpt2-random")
        for r in range(args.rounds):
            for name in names:
                p, s = time_variant(name, model_dir, args.block_size, args.iters)
                passes[name] += p
                steps[name] += s
                print(f"round {r + 1}/{args.rounds} {name}: passes {' '.join(f'{x:.2f}' for x in p)}, step "
                      f"{' '.join(f'{x:.2f}' for x in s)} CPU s; {time.time() - started:.0f} s so far", flush=True)
    # the least disturbed iteration: other processes on the machine only ever add time (even to CPU seconds,
    # through shared caches and memory bandwidth); the spread is in the table
    fb = {n: min(v) for n, v in passes.items()}
    st = {n: min(v) for n, v in steps.items()}
    tokens = SEQUENCES * args.block_size
    lines = [f"\n### Costs of the memory tools on this CPU ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__} on 1 thread, load average "
             f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start, {(time.time() - started) / 60:.0f} min)\n",
             f"`python bench/step_costs.py --block_size={args.block_size} --iters={args.iters} "
             f"--rounds={args.rounds}`: GPT-2 124M shape (random weights), {SEQUENCES} x {args.block_size} tokens "
             f"per iteration; CPU seconds (one thread) of the forward and backward passes and of the optimizer "
             f"step, each the least of {args.iters * args.rounds} iterations\n",
             "| variant | passes (each iteration) | passes (least) | step (least) | iteration | / full |",
             "|---|---|---|---|---|---|"]
    for n in names:
        ratio = f"{(fb[n] + st[n]) / (fb['full'] + st['full']):.3f}" if "full" in fb else ""
        lines.append(f"| {n} | {' '.join(f'{x:.2f}' for x in passes[n])} | {fb[n]:.3f} | {st[n]:.3f} | "
                     f"{fb[n] + st[n]:.3f} | {ratio} |")
    shape = Shape(12, 12, 768, 50257, args.block_size)
    base, adapters, total = parameter_counts(shape, "lora", DEFAULTS["lora_r"], DEFAULTS["lora_targets"])
    derived = []
    if "full" in fb:
        fpt = flops_per_token(base, 12, 12, 768, args.block_size)
        derived.append(f"CPU_FLOPS (one core): {fpt:.3g} FLOPs/token x {tokens} tokens / {fb['full']:.3f} s of full's "
                       f"passes = {fpt * tokens / fb['full']:.3g}")
        derived.append(f"AdamW step, CPU seconds per trained parameter: {st['full']:.3f} / {base} = "
                       f"{st['full'] / base:.3g}")
        if "full_8bit" in st:
            derived.append(f"AdamW8bit step, CPU seconds per trained parameter: {st['full_8bit']:.3f} / {base} = "
                           f"{st['full_8bit'] / base:.3g}")
        if "full_micro1" in fb and "lora_micro1" in fb:
            fixed = fb["lora_micro1"] - fb["lora"]  # LoRA's gradients are tiny: what is left is the fixed part
            derived.append(f"MICRO_STEP_SECONDS (one more micro-step of the same tokens, LoRA): "
                           f"{fb['lora_micro1']:.3f} - {fb['lora']:.3f} = {fixed:.3f} s")
            per = (fb["full_micro1"] - fb["full"] - fixed) / base
            derived.append(f"gradient accumulation, CPU seconds per trained parameter and extra micro-step: "
                           f"({fb['full_micro1']:.3f} - {fb['full']:.3f} - {fixed:.3f}) / {base} = {per:.3g}")
        if "full_ckpt" in fb:
            fwd = recompute_flops_per_token(12, 768, args.block_size)
            derived.append(f"recomputation: passes {fb['full_ckpt'] / fb['full']:.3f}x full's; the FLOPs count "
                           f"says {1 + fwd / fpt:.3f}x")
        if "lora" in fb:
            lora_fpt = flops_per_token(total, 12, 12, 768, args.block_size, "lora", adapters)
            derived.append(f"LoRA's passes: {fb['lora'] / fb['full']:.3f}x full's; the FLOPs count says "
                           f"{lora_fpt / fpt:.3f}x")
        if "full_adam_mini" in st:
            derived.append(f"Adam-mini step on fp32 weights, CPU seconds per trained parameter: "
                           f"{st['full_adam_mini']:.3f} / {base} = {st['full_adam_mini'] / base:.3g}")
        for tool in ("bf16_kahan", "bf16_sr", "bf16_sr_4bit", "bf16_adam_mini"):
            if tool in st and "bf16" in st:
                derived.append(f"{tool} step, CPU seconds per trained parameter: {st[tool]:.3f} / {base} = "
                               f"{st[tool] / base:.3g} (fp32 masters' step in bf16 training: {st['bf16'] / base:.3g})")
        if "bf16_kahan_release" in fb and "bf16_kahan" in fb:
            inside = fb["bf16_kahan_release"] + st["bf16_kahan_release"] - fb["bf16_kahan"]
            derived.append(f"the step inside the backward, CPU seconds per trained parameter: passes and step "
                           f"{fb['bf16_kahan_release'] + st['bf16_kahan_release']:.3f} - bf16_kahan's passes "
                           f"{fb['bf16_kahan']:.3f} = {inside:.3f} / {base} = {inside / base:.3g}")
        if "qlora" in fb and "lora" in fb:
            quantized = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # the blocks' four projections
            derived.append(f"QLoRA's dequantization per micro-step: {fb['qlora']:.3f} - {fb['lora']:.3f} s over "
                           f"{quantized} 4-bit weights = {(fb['qlora'] - fb['lora']) / quantized:.3g} s per weight")
    lines += ["", *[f"- {d}" for d in derived]]
    publish("\n".join(lines).strip("\n"), args.results)


if __name__ == "__main__":
    main()
