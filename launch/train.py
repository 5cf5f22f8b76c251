"""Train a GPT-2: `deepspeed launch/train.py --recipe NAME [--key=value ...]`.

Also `python launch/train.py recipes/X.py --key=value` (one process, no launcher) and
`--plan [--json] [--vram_gb=24] [--gpus=1]` to print the memory plan and exit.
"""
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import launcher_rank, launcher_world, run_main, started_alone  # noqa: E402
from trainer.config import resolve_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402

# Flags of this command that are not recipe keys: type, and for numbers the valid range.
LAUNCH_FLAGS = {"--plan": bool, "--json": bool, "--vram_gb": float, "--gpus": int}
LAUNCH_RANGES = {"--vram_gb": ((lambda v: v > 0), "more than 0 (GiB of memory per GPU)"),
                 "--gpus": ((lambda v: v >= 1), "1 or more")}


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

    from trainer.ranks import local_rank
    if torch.cuda.is_available():  # this node's GPU, by local rank: the setup's collectives run on it
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    deepspeed.init_distributed()


def print_plan(cfg, flags):
    """--plan: the plan for the given or detected hardware, without loading weights or data."""
    from trainer import planner
    from trainer.data import dataset_dir, read_meta

    meta_path = dataset_dir(cfg) / "meta.pkl"
    vocab = read_meta(dataset_dir(cfg))["vocab_size"] if meta_path.is_file() else 50257
    run_config = Path(cfg["out_dir"]) / "model_config.json" if cfg["init_from"] == "resume" else None
    shape = planner.run_shape(cfg, vocab, run_config)
    world = launcher_world()  # every GPU of every node
    hw = planner.detect_hardware(world, vram_gb=flags.get("vram_gb"), gpus=flags.get("gpus"))
    plan = planner.make_plan({**cfg, **shape}, hw)
    if flags.get("json"):
        print(json.dumps(planner.plan_to_dict(plan)))
    else:
        print(planner.format_plan(plan))


def main(argv):
    flags, rest = split_launch_flags(argv)
    cfg, _ = resolve_config(rest)
    if flags.get("plan"):
        if launcher_rank() == 0:
            print_plan(cfg, flags)
        return 0
    from trainer.adapters import check_source
    check_source(cfg["mode"], cfg["init_from"])  # before any rank starts or writes
    init_distributed()
    from trainer.loop import train
    hardware = {k: flags[k] for k in ("vram_gb", "gpus") if k in flags}
    train(cfg, hardware)
    return 0


if __name__ == "__main__":
    run_main(main)
