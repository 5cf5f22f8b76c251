"""Print the README's table of plans: the four GPT-2 sizes x 8, 12, 16, 24, 40, 80 GB GPUs.

Each row is what `deepspeed launch/train.py --recipe gpt2_<size> --plan --vram_gb=G --gpus=N`
chooses: the recipe's values (recipes/gpt2_small|medium|large|xl.py) on top of the
defaults, planned by trainer.planner. Nothing is loaded; it runs in well under a second.

    python bench/plan_table.py                 # auto mode, 1 GPU
    python bench/plan_table.py --mode=full     # full fine-tuning (offload allowed)
    python bench/plan_table.py --gpus=4
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import DEFAULTS, RECIPES_DIR, read_recipe  # noqa: E402
from trainer.memory_model import GPT2_SHAPES, GPT2_VOCAB  # noqa: E402
from trainer.planner import PlanError, detect_hardware, fmt_bytes, make_plan  # noqa: E402

RECIPES = {"gpt2": "gpt2_small", "gpt2-medium": "gpt2_medium", "gpt2-large": "gpt2_large", "gpt2-xl": "gpt2_xl"}
VRAM_GB = (8, 12, 16, 24, 40, 80)


def recipe_cfg(model, **overrides):
    cfg = {**DEFAULTS, **read_recipe(RECIPES_DIR / f"{RECIPES[model]}.py"), **overrides}
    n_layer, n_head, n_embd = GPT2_SHAPES[model]
    cfg.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=GPT2_VOCAB)
    return cfg


def rows(mode, gpus):
    for model in RECIPES:
        cfg = recipe_cfg(model, mode=mode)
        for gb in VRAM_GB:
            hw = detect_hardware(gpus, vram_gb=gb, gpus=gpus)
            try:
                p = make_plan(cfg, hw)
            except PlanError as exc:
                need = str(exc).split(", i.e. ")[1].split(";")[0] if ", i.e. " in str(exc) else str(exc)
                yield [model, f"{gb} GB", "does not fit", "", "", "", "", need]
                continue
            yield [model, f"{gb} GB", p.mode, str(p.zero_stage), p.offload,
                   "on" if p.gradient_checkpointing else "off",
                   f"{p.micro_batch_size} x {p.grad_accum_per_rank}",
                   f"{fmt_bytes(p.total_bytes)} / {fmt_bytes(p.usable_bytes)}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="auto", choices=["auto", "full", "lora", "qlora"])
    ap.add_argument("--gpus", type=int, default=1)
    args = ap.parse_args()
    head = ["model", "GPU", "mode", "ZeRO", "offload", "checkpointing", "micro x accum",
            "est. peak / usable"]
    print(f"Plans with --mode={args.mode} on {args.gpus} GPU{'s' if args.gpus > 1 else ''} "
          f"(recipes gpt2_small/medium/large/xl, block 1024, bf16):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows(args.mode, args.gpus):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
