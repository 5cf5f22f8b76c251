"""Train a GPT-2: `deepspeed launch/train.py --recipe NAME [--key=value ...]`.

Also `python launch/train.py recipes/X.py --key=value` (one process, no launcher) and
`--plan [--json] [--vram_gb=24] [--gpus=1] [--simulate]` to print the memory plan and exit (--simulate:
beside the plan's training step run on fake tensors, trainer/simulate.py).
"""
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import USER_ERROR_EXIT, launcher_rank, launcher_world, run_main, started_alone  # noqa: E402
from trainer.config import RECIPES_DIR, describe_keys, recipe_names, recipe_summary, resolve_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402

# Flags of this command that are not recipe keys: type, and for numbers the valid range.
LAUNCH_FLAGS = {"--plan": bool, "--json": bool, "--vram_gb": float, "--gpus": int, "--simulate": bool}
LAUNCH_RANGES = {"--vram_gb": ((lambda v: v > 0), "more than 0 (GiB of memory per GPU)"),
                 "--gpus": ((lambda v: v >= 1), "1 or more")}


USAGE = """usage: deepspeed [--num_gpus N] launch/train.py --recipe NAME [--key=value ...] [--plan [--json]]
       python launch/train.py [--recipe] NAME_OR_PATH [--key=value ...]      (one process, no launcher)

Train (or finetune) a GPT-2 with a recipe. A recipe is a file of `key = value` lines (recipes/NAME.py or
any path); every key below can be overridden as --key=value or --key value (Python literals:
--lora_targets="['c_attn']", --decay_lr=False; anything else is text). The plan keys left on `auto`
are chosen by the planner for your GPU memory (see docs/plan.md).

launch flags (not recipe keys):
  --plan            print the plan (mode, ZeRO stage, offload, checkpointing, micro-batch, dtype) and its
                    memory table, then exit without loading weights or data
  --json            with --plan: one JSON object instead of the table
  --vram_gb=GB      plan for a GPU of this many GiB instead of the detected one (more than 0)
  --gpus=N          plan for N GPUs (ranks) instead of the launcher's WORLD_SIZE (1 or more)
  --simulate        with --plan: also run the plan's training step on fake tensors (no weights, no data,
                    no GPU) and print simulated beside estimated bytes per memory item (docs/plan.md)
  -h, --help        this text

A mistake in a recipe, a key or a flag is one line `error: ...` and exit code {exit_code}."""


def help_text():
    recipes = "\n".join(f"  {name:<22} {recipe_summary(RECIPES_DIR / f'{name}.py')}" for name in recipe_names())
    return (USAGE.format(exit_code=USER_ERROR_EXIT) + f"\n\nrecipes (recipes/NAME.py):\n{recipes}\n\n"
            f"keys, with their defaults and valid values:" + describe_keys())


def split_launch_flags(argv):
    """Separate --plan/--json/--vram_gb/--gpus (and the launcher's --local_rank) from recipe words."""
    flags, rest = {}, []
    words = list(argv)
    while words:
        word = words.pop(0)
        name, _, value = word.partition("=")
        if name == "--local_rank" or name == "--local-rank":  # added by the deepspeed launcher
            if not value and words:
                words.pop(0)
            continue
        if name in LAUNCH_FLAGS:
            kind = LAUNCH_FLAGS[name]
            if kind is bool:
                flags[name[2:]] = True
                continue
            if not value:
                if not words:
                    raise UserError(f"{name} needs a value, e.g. {name}=24")
                value = words.pop(0)
            try:
                number = kind(value)
            except ValueError:
                raise UserError(f"{name}={value!r} must be a number, e.g. {name}=24") from None
            valid, must = LAUNCH_RANGES[name]
            if not valid(number):
                raise UserError(f"{name}={value} must be {must}")
            flags[name[2:]] = number
            continue
        rest.append(word)
    return flags, rest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Under `deepspeed` the launcher sets RANK etc. (under an MPI or srun launch DeepSpeed discovers them);
    a plain `python` run is a world of one."""
    if started_alone():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    import deepspeed
    import torch

    from trainer.ranks import local_rank, release_cpu_allreduce_buffer
    if torch.cuda.is_available():  # this node's GPU, by local rank: the setup's collectives run on it
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    deepspeed.init_distributed()
    release_cpu_allreduce_buffer()


def print_plan(cfg, flags):
    """--plan: the plan for the given or detected hardware, without loading weights or data."""
    from trainer import planner
    from trainer.data import dataset_dir, read_meta

    meta = read_meta(dataset_dir(cfg)) if (dataset_dir(cfg) / "meta.pkl").is_file() else {}
    run_config = Path(cfg["out_dir"]) / "model_config.json" if cfg["init_from"] == "resume" else None
    shape = {**planner.run_shape(cfg, meta.get("vocab_size", 50257), run_config),
             "packed": meta.get("format") == "instructions"}  # packed instruction blocks, as the run will plan
    world = launcher_world()  # every GPU of every node
    hw = planner.detect_hardware(world, vram_gb=flags.get("vram_gb"), gpus=flags.get("gpus"))
    plan = planner.make_plan({**cfg, **shape}, hw)
    out = planner.plan_to_dict(plan) if flags.get("json") else planner.format_plan(plan)
    if flags.get("simulate"):
        from trainer.simulate import add_simulation
        out = add_simulation(out, {**cfg, **shape}, plan)
    print(json.dumps(out) if flags.get("json") else out)


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    flags, rest = split_launch_flags(argv)
    cfg, _ = resolve_config(rest)
    if flags.get("plan"):
        if launcher_rank() == 0:
            print_plan(cfg, flags)
        return 0
    if launcher_world() == 1 and cfg["init_from"] != "resume":
        # One process opens its data before importing torch, transformers and DeepSpeed (6-7 s): a missing
        # or broken dataset is one line at once. Several ranks check together in build_run (a dataset
        # missing on one node only is named with the node); a resume takes dataset and block_size from
        # the run, so build_run checks its data.
        from trainer.mixing import open_data
        open_data(cfg)
    from trainer.adapters import check_source
    check_source(cfg["mode"], cfg["init_from"])  # before any rank starts or writes
    init_distributed()
    from trainer.loop import train
    hardware = {k: flags[k] for k in ("vram_gb", "gpus") if k in flags}
    train(cfg, hardware)
    return 0


if __name__ == "__main__":
    run_main(main)
