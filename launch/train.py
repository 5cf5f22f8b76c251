"""Train a GPT-2: `deepspeed launch/train.py --recipe NAME [--key=value ...]`.

Also `python launch/train.py recipes/X.py --key=value` (one process, no launcher; a nanoGPT config file works
the same), `torchrun --standalone --nproc_per_node=N launch/train.py recipes/X.py`, and
`--plan [--json] [--vram_gb=24] [--gpus=1] [--simulate]` to print the memory plan and exit (--simulate:
beside the plan's training step run on fake tensors, trainer/plan/simulate.py).
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer, even if another is installed

from trainer.startup import CLOCK  # noqa: E402  (first: its clock times the rest of the start-up)
from trainer.launcher import use_expandable_segments  # noqa: E402

ALLOCATOR = use_expandable_segments()  # before anything starts CUDA's allocator (docs/plan.md: fragmentation)

from trainer.cli import USER_ERROR_EXIT, FlagParser, at_least, more_than, number, run_main  # noqa: E402
from trainer.config import (DEEPSPEED_DECIDES, RECIPES_DIR, add_config_arguments, config_from_args,  # noqa: E402
                            describe_keys, recipe_names, recipe_summary)
from trainer.errors import UserError  # noqa: E402
from trainer.launcher import (free_port, is_port_in_use, launcher_rank, launcher_world, local_rank,  # noqa: E402
                              started_alone)
from trainer.lock import FolderLock  # noqa: E402
from trainer.model.shapes import check_model_folder  # noqa: E402

USAGE = """usage: deepspeed [--num_gpus N] launch/train.py --recipe NAME [--key=value ...] [--plan [--json]]
       python launch/train.py [--recipe] NAME_OR_PATH [--key=value ...]      (one process, no launcher)
       torchrun --standalone --nproc_per_node=N launch/train.py NAME_OR_PATH [--key=value ...]

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


def parser():
    """launch/train.py's flags: the launch flags above, the recipe and every config key (trainer/config.py)."""
    p = FlagParser(__doc__, help_text=help_text)
    p.add_argument("--plan", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--simulate", action="store_true")
    p.add_flag("--vram_gb", type=number, rule=more_than(0, " (GiB of memory per GPU)"))
    p.add_flag("--gpus", type=int, rule=at_least(1))
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return add_config_arguments(p)


PORT_ATTEMPTS = 5  # a one-process run picks its own port; another launch may take it in between


def init_distributed():
    """Under `deepspeed` or torchrun the launcher sets RANK etc. (under an MPI or srun launch DeepSpeed
    discovers them); a plain `python` run is a world of one on a port it picks itself."""
    import deepspeed
    import torch

    from trainer.run.ranks import release_cpu_allreduce_buffer
    CLOCK.mark("importing DeepSpeed")
    if torch.cuda.is_available():  # this node's GPU, by local rank: the setup's collectives run on it
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    alone = started_alone()
    for attempt in range(PORT_ATTEMPTS if alone else 1):
        if alone:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        try:
            deepspeed.init_distributed()
            break
        except torch.distributed.DistNetworkError as exc:
            if not is_port_in_use(exc):
                raise
            if not alone:  # rank 0 serves the rendezvous on the launcher's port: another run holds it
                port = os.environ.get("MASTER_PORT", "29500")
                raise UserError(f"port {port}, where the ranks meet (MASTER_PORT), is in use on this machine, "
                                f"probably by another run; launch with another port: deepspeed --master_port="
                                f"{int(port) + 1} ... (torchrun: --master_port={int(port) + 1})") from None
            if attempt == PORT_ATTEMPTS - 1:
                raise
    release_cpu_allreduce_buffer()
    CLOCK.mark("starting torch.distributed")


def deepspeed_decides(cfg):
    """One line for nanoGPT's `device` and `backend` when the config sets them: what this run uses instead."""
    given = [f"{key}={getattr(cfg, key)!r}" for key in DEEPSPEED_DECIDES if getattr(cfg, key)]
    if not given:
        return None
    import torch
    where = "the GPUs, one per rank" if torch.cuda.is_available() else "the CPU"
    return (f"note: {', '.join(given)} (nanoGPT's) are DeepSpeed's to decide here: each rank runs on its own GPU "
            f"when there is one; this run: {where}, backend {torch.distributed.get_backend()}")


def print_plan(cfg, args):
    """--plan: the plan for the given or detected hardware, without loading weights or data."""
    from trainer.data.tokens import dataset_dir, read_meta
    from trainer.model.shapes import model_shape
    from trainer.plan.hardware import detect_hardware
    from trainer.plan.planner import PlanInput, make_plan
    from trainer.plan.report import format_plan, plan_to_dict
    from trainer.run.run_dir import RunDir

    meta = read_meta(dataset_dir(cfg)) if (dataset_dir(cfg) / "meta.pkl").is_file() else {}
    saved_model = RunDir(cfg.out_dir).model_config_path if cfg.init_from == "resume" else None
    if cfg.init_from != "resume" and RunDir(cfg.init_from).is_run():  # a new run from another run
        from trainer.run.continuation import continue_run, model_config
        cfg = continue_run(cfg).cfg
        saved_model = model_config(cfg) or RunDir(cfg.continued_from).model_config_path
    shape = model_shape(cfg, meta.get("vocab_size", 50257), saved_model)
    # packed instruction blocks, as the run will plan
    plan_input = PlanInput.of(cfg, shape, packed=meta.get("format") == "instructions")
    hw = detect_hardware(launcher_world(), vram_gb=args.vram_gb, gpus=args.gpus)  # every GPU of every node
    plan = make_plan(plan_input, hw)
    out = plan_to_dict(plan) if args.json else format_plan(plan)
    if args.simulate:
        from trainer.plan.simulate import add_simulation
        out = add_simulation(out, cfg, plan_input, plan)
    print(json.dumps(out) if args.json else out)


def main(argv):
    flags = parser()
    args, unknown = flags.parse_known_args(argv)
    cfg, _ = config_from_args(flags.check_ranges(args), unknown)
    CLOCK.mark("flags and config")
    if args.plan:
        if launcher_rank() == 0:
            print_plan(cfg, args)
        return 0
    # One writer per out_dir, before anything is read or written: global rank 0 holds the lock for the whole
    # run (the other ranks write only inside the checkpoint saves rank 0 coordinates). trainer/lock.py
    lock = FolderLock(cfg.out_dir, "a training run", "choose another --out_dir") if launcher_rank() == 0 else None
    with lock or nullcontext():
        return train_locked(cfg, args)


def train_locked(cfg, args):
    if launcher_world() == 1 and cfg.init_from != "resume":
        # One process opens its data before importing torch, transformers and DeepSpeed (6-7 s): a missing
        # or broken dataset is one line at once. Several ranks check together in build_run (a dataset
        # missing on one node only is named with the node); a resume takes dataset and block_size from
        # the run, so build_run checks its data.
        from trainer.data.mixing import open_data
        open_data(cfg)
        CLOCK.mark("opening the data")
    check_model_folder(cfg.init_from)  # another architecture than GPT-2 is one line, before the imports
    from trainer.model.adapters import check_source
    check_source(cfg.mode, cfg.init_from)  # before any rank starts or writes
    CLOCK.mark("importing torch and transformers")
    init_distributed()
    note = deepspeed_decides(cfg)
    if note and launcher_rank() == 0:
        print(note, flush=True)
    from trainer.run.loop import train
    CLOCK.mark("importing the trainer's run modules")
    hardware = {"vram_gb": args.vram_gb, "gpus": args.gpus}
    train(cfg, {k: v for k, v in hardware.items() if v is not None})
    return 0


if __name__ == "__main__":
    run_main(main)
