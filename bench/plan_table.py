"""Print the README's table of plans: the four GPT-2 sizes x 4, 8, 10, 12, 16, 24, 40, 80 GB GPUs.

Each row is what `deepspeed launch/train.py --recipe gpt2_<size> --plan --vram_gb=G --gpus=N`
chooses: the recipe's values (recipes/gpt2_small|medium|large|xl.py) on top of the
defaults, planned by trainer/plan/planner.py. Nothing is loaded; it runs in well under a second.

    python bench/plan_table.py                 # auto mode, 1 GPU
    python bench/plan_table.py --mode=full     # full fine-tuning (offload allowed)
    python bench/plan_table.py --gpus=4
    python bench/plan_table.py --simulate      # + each plan's step simulated on fake tensors (minutes)

"est. time" is the cost model's time per iteration relative to the plain plan (trainer/plan/cost.py).
With --simulate each row also gets the simulation's verdict (trainer/plan/simulate.py): the peak with the
simulated activations + logits and optimizer step in place of the estimated ones (model states,
DeepSpeed's buckets, fragmentation and the CUDA context as estimated), against the usable memory.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import RECIPES_DIR, Config, read_recipe  # noqa: E402
from trainer.model.shapes import GPT2_SHAPES, GPT2_VOCAB, Shape  # noqa: E402
from trainer.plan.hardware import detect_hardware  # noqa: E402
from trainer.plan.memory import CUDA_CONTEXT_BYTES, FRAGMENTATION  # noqa: E402
from trainer.plan.planner import PlanError, PlanInput, make_plan  # noqa: E402
from trainer.units import format_bytes  # noqa: E402

RECIPES = {"gpt2": "gpt2_small", "gpt2-medium": "gpt2_medium", "gpt2-large": "gpt2_large", "gpt2-xl": "gpt2_xl"}
VRAM_GB = (4, 8, 10, 12, 16, 24, 40, 80)


def recipe_cfg(model, **overrides):
    """(config, shape): the model's recipe on top of the defaults, with overrides, and GPT-2's shape."""
    cfg = Config(**{**read_recipe(RECIPES_DIR / f"{RECIPES[model]}.py"), **overrides})
    return cfg, Shape(*GPT2_SHAPES[model], GPT2_VOCAB, cfg.block_size)


def simulated_peak(cfg, shape, plan):
    """The plan's peak with the simulated step's activations + logits and optimizer step."""
    from trainer.plan.simulate import simulate
    sim = simulate(cfg, shape, plan)
    m = plan.estimate.items
    states = m["weights"] + m["gradients"] + m["optimizer_states"] + m["ds_buckets"]
    allocated = states + max(sim.items["activations_and_logits"], sim.items["optimizer_step_transient"])
    return int(allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES)


def rows(mode, gpus, simulate=False):
    for model in RECIPES:
        cfg, shape = recipe_cfg(model, mode=mode)
        for gb in VRAM_GB:
            hw = detect_hardware(gpus, vram_gb=gb, gpus=gpus)
            try:
                p = make_plan(PlanInput.of(cfg, shape), hw)
            except PlanError as exc:
                need = str(exc).split(", i.e. ")[1].split(";")[0] if ", i.e. " in str(exc) else str(exc)
                yield [model, f"{gb} GB", "does not fit", "", "", "", "", "", "", "", "", "", need] + \
                    ([""] if simulate else [])
                continue
            row = [model, f"{gb} GB", p.mode, str(p.zero_stage), p.offload,
                   "on" if p.gradient_checkpointing else "off", "on" if p.activation_offload else "off",
                   p.optimizer, p.grad_accum_dtype, p.master_weights, "in backward" if p.optimizer_in_backward else "",
                   f"{p.micro_batch_size} x {p.grad_accum_per_rank}",
                   f"{p.step_time:.2f}",
                   f"{format_bytes(p.estimate.total)} / {format_bytes(p.usable_bytes)}"]
            if simulate:
                peak = simulated_peak(cfg, shape, p)
                row.append(f"{'fits' if peak <= p.usable_bytes else 'OVER'}: {format_bytes(peak)}")
            yield row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="auto", choices=["auto", "full", "lora", "qlora"])
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--simulate", action="store_true", help="add the simulated step's verdict per row")
    args = ap.parse_args()
    head = ["model", "GPU", "mode", "ZeRO", "offload", "checkpointing", "act. offload", "optimizer", "accum",
            "weights", "step", "micro x accum", "est. time", "est. peak / usable"] + (["simulated peak"] if args.simulate else [])
    print(f"Plans with --mode={args.mode} on {args.gpus} GPU{'s' if args.gpus > 1 else ''} "
          f"(recipes gpt2_small/medium/large/xl, block 1024, bf16):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows(args.mode, args.gpus, args.simulate):
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
