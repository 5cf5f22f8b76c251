"""The memory model against the simulated training step: every GPT-2 size x full/LoRA/QLoRA x
checkpointing off/on x micro-batch 1 and 4, block 1024, bf16 and fp16, the planner's memory tools forced one
at a time (8-bit AdamW, bf16 gradient accumulation, activation offload, QLoRA with paged 8-bit AdamW), plus
the plans the README's table chooses (bench/plan_table.py), each planned by trainer/plan/planner.py and run on
fake tensors by trainer/plan/simulate.py (no weights, no data, no GPU).

    python bench/simulate_table.py                        # writes bench/SIMULATE.md (about 40 minutes on 2 cores)
    python bench/simulate_table.py --sizes gpt2 --out -   # a subset, to stdout

Per row: activations + logits_and_loss (estimated, simulated, error) and the optimizer-step transient
of the optimizer DeepSpeed runs for the plan (torch AdamW under FP16_UnfusedOptimizer at ZeRO-0).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plan_table import RECIPES, VRAM_GB, recipe_cfg  # noqa: E402
from trainer.plan.hardware import detect_hardware  # noqa: E402
from trainer.plan.planner import PlanError, PlanInput, make_plan  # noqa: E402
from trainer.plan.simulate import comparison, simulate  # noqa: E402
from trainer.units import format_bytes  # noqa: E402

OUT = Path(__file__).resolve().parent / "SIMULATE.md"
MODES = ("full", "lora", "qlora")


def grid(sizes, dtypes):
    """(label, model, cfg overrides, vram_gb) of the calibration grid: fixed plans, on a card they fit."""
    for dtype in dtypes:
        for model in sizes:
            for mode in MODES:
                for ckpt in (False, True):
                    for micro in (1, 4):
                        yield ("grid", model, dict(mode=mode, gradient_checkpointing=ckpt, micro_batch_size=micro,
                                                   dtype=dtype, zero_stage=0, offload="none"), 1000)


TOOLS = {"adamw8bit": dict(mode="full", optimizer="adamw8bit", gradient_checkpointing=True),
         "accum bf16": dict(mode="full", grad_accum_dtype="bf16", gradient_checkpointing=True),
         "activation offload": dict(mode="full", activation_offload=True, gradient_checkpointing=True),
         "qlora paged_adamw8bit": dict(mode="qlora", optimizer="paged_adamw8bit", gradient_checkpointing=False)}


def toolbox(sizes):
    """Each memory tool forced on a fixed ZeRO-0 plan (micro-batch 4, bf16), on a card it fits."""
    for model in sizes:
        for tool, keys in TOOLS.items():
            yield ("toolbox", model, dict(keys, micro_batch_size=4, dtype="bf16", zero_stage=0, offload="none",
                                          tool=tool), 1000)


def table_plans(sizes):
    """The plans the README's table chooses (auto mode, one GPU, bf16)."""
    for model in sizes:
        for gb in VRAM_GB:
            yield ("table", model, {}, gb)


def run_row(kind, model, overrides, vram_gb):
    overrides = dict(overrides)
    tool = overrides.pop("tool", "")
    cfg, shape = recipe_cfg(model, **overrides)
    try:
        plan = make_plan(PlanInput.of(cfg, shape), detect_hardware(1, vram_gb=vram_gb, gpus=1))
    except PlanError:
        return None
    t0 = time.time()
    # estimated, simulated and their difference per item, as --plan --simulate prints them
    items = {r["item"]: r for r in comparison(plan, simulate(cfg, shape, plan))}
    act, opt = items["activations_and_logits"], items["optimizer_step_transient"]
    return {"kind": kind, "model": model, "gpu": f"{vram_gb} GB" if kind == "table" else "-", "mode": plan.mode,
            "ckpt": plan.gradient_checkpointing, "micro": plan.micro_batch_size, "dtype": plan.dtype,
            "zero": plan.zero_stage, "offload": plan.offload,
            "est_act": act["estimated"], "sim_act": act["simulated"], "err_act": act["difference"],
            "est_opt": opt["estimated"], "sim_opt": opt["simulated"], "err_opt": opt["difference"],
            "tool": tool, "optimizer": plan.optimizer, "accum": plan.grad_accum_dtype,
            **{f"{side}_{item}": items[item][key] for item in ("gradients", "optimizer_states")
               for side, key in (("est", "estimated"), ("sim", "simulated"))},
            "seconds": time.time() - t0}


def markdown(rows, command):
    head = ["rows", "model", "GPU", "mode", "ckpt", "micro", "dtype", "est. act+logits", "sim. act+logits", "error",
            "est. opt step", "sim. opt step", "error"]
    lines = [f"Written by `{command}`: the memory model (trainer/plan/memory.py) against the training step "
             f"simulated on fake tensors (trainer/plan/simulate.py), block 1024, ZeRO-0, one GPU. Error = "
             f"(estimated - simulated) / simulated.", ""]
    tools = [r for r in rows if r["kind"] == "toolbox"]
    if tools:
        lines += ["## The memory tools, one at a time (ZeRO-0, micro-batch 4, bf16)", "",
                  "| model | tool | optimizer | accum | gradients est. / sim. | optimizer states est. / sim. | "
                  "act+logits est. / sim. | error | opt step est. / sim. | error |", "|" + "---|" * 10]
        for r in tools:
            lines.append(f"| {r['model']} | {r['tool']} | {r['optimizer']} | {r['accum']} | "
                         f"{format_bytes(r['est_gradients'])} / {format_bytes(r['sim_gradients'])} | "
                         f"{format_bytes(r['est_optimizer_states'])} / {format_bytes(r['sim_optimizer_states'])} | "
                         f"{format_bytes(r['est_act'])} / {format_bytes(r['sim_act'])} | {100 * r['err_act']:+.1f}% | "
                         f"{format_bytes(r['est_opt'])} / {format_bytes(r['sim_opt'])} | {100 * r['err_opt']:+.1f}% |")
        lines.append("")
    for kind, title in (("grid", "Calibration grid"), ("table", "Plans the README's table chooses (auto, bf16)")):
        sub = [r for r in rows if r["kind"] == kind]
        if not sub:
            continue
        worst_act = max(sub, key=lambda r: abs(r["err_act"]))
        worst_opt = max(sub, key=lambda r: abs(r["err_opt"]))
        lines += [f"## {title}", "",
                  f"max |error|: activations + logits {100 * abs(worst_act['err_act']):.1f}% "
                  f"({worst_act['model']} {worst_act['mode']} ckpt={worst_act['ckpt']} micro {worst_act['micro']}), "
                  f"optimizer step {100 * abs(worst_opt['err_opt']):.1f}%", ""]
        for mode in MODES:
            msub = [r for r in sub if r["mode"] == mode]
            if msub:
                lines.append(f"- {mode}: max |error| activations + logits "
                             f"{100 * max(abs(r['err_act']) for r in msub):.1f}%, optimizer step "
                             f"{100 * max(abs(r['err_opt']) for r in msub):.1f}% ({len(msub)} rows)")
        lines += ["", "| " + " | ".join(head[1:]) + " |", "|" + "---|" * (len(head) - 1)]
        for r in sub:
            lines.append("| " + " | ".join([r["model"], r["gpu"], r["mode"], "on" if r["ckpt"] else "off",
                                             str(r["micro"]), r["dtype"], format_bytes(r["est_act"]), format_bytes(r["sim_act"]),
                                             f"{100 * r['err_act']:+.1f}%", format_bytes(r["est_opt"]), format_bytes(r["sim_opt"]),
                                             f"{100 * r['err_opt']:+.1f}%"]) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=list(RECIPES))
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"])
    ap.add_argument("--no-table", action="store_true", help="only the calibration grid")
    ap.add_argument("--out", default=str(OUT), help="markdown file, or - for stdout")
    args = ap.parse_args()
    jobs = (list(toolbox(args.sizes)) + list(grid(args.sizes, args.dtypes))
            + ([] if args.no_table else list(table_plans(args.sizes))))
    rows = []
    command = "python bench/simulate_table.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    for i, job in enumerate(jobs):
        row = run_row(*job)
        if row is None:
            continue
        rows.append(row)
        print(f"[{i + 1}/{len(jobs)}] {row['model']} {row['gpu']} {row['mode']} ckpt={row['ckpt']} "
              f"micro={row['micro']} {row['dtype']}: act {100 * row['err_act']:+.1f}% opt {100 * row['err_opt']:+.1f}% "
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if args.out != "-":  # after every row: a long run interrupted still leaves its rows
            done = "" if i + 1 == len(jobs) else f"\n(incomplete: {len(rows)} of {len(jobs)} rows so far)\n"
            Path(args.out).write_text(markdown(rows, command) + "\n" + done)
    if args.out == "-":
        print(markdown(rows, command))
    else:
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
