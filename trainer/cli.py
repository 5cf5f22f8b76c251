"""What every entry point shares: a user mistake is one `error:` line and exit code 2.

Flags of sample.py, eval.py and merge_adapter.py go through FlagParser: argparse's own mistakes
(an unknown flag, a value of the wrong type) and values out of range (check_ranges) become the
same one-line error instead of argparse's usage block.
"""
import argparse
import gc
import os
import sys

from trainer.errors import UserError

# Where launchers put the global rank and the number of processes before torch.distributed starts:
# DeepSpeed's own launcher and torchrun (RANK), OpenMPI, MPICH / Intel MPI (PMI), MVAPICH, Slurm's srun.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def launcher_rank():
    """This process's global rank as its launcher set it, before torch.distributed starts (0 without one)."""
    return next((int(os.environ[name]) for name in RANK_VARIABLES if name in os.environ), 0)


def launcher_world():
    """The number of processes the launcher started, before torch.distributed starts (1 without one)."""
    return next((int(os.environ[name]) for name in SIZE_VARIABLES if name in os.environ), 1)


def started_alone():
    """No launcher of several processes: the trainer is a world of one (an MPI or srun launch is not)."""
    return "RANK" not in os.environ and all(int(os.environ.get(name, "1")) <= 1 for name in SIZE_VARIABLES)


USER_ERROR_EXIT = 2  # every entry point, for every user mistake (argparse uses 2 as well)


class FlagParser(argparse.ArgumentParser):
    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


def at_least(low):
    return (lambda v: v >= low), f"{low} or more"


def more_than(low):
    return (lambda v: v > low), f"more than {low}"


def check_ranges(args, rules):
    """rules: {flag name: (valid, must)}; None values (flag not given) are not checked."""
    for name, (valid, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not valid(value):
            raise UserError(f"--{name}={value!r} must be {must}")
    return args


def run_main(main):
    try:
        code = main(sys.argv[1:])
    except UserError as exc:
        # Every rank meets the same bad input (the setup's checks make every rank raise a mistake any rank
        # sees); one line is enough: global rank 0's, or the only process's.
        if launcher_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        code = USER_ERROR_EXIT
    exit_quickly(code)


def exit_quickly(code):
    """sys.exit(code), sparing the interpreter's exit the garbage collector's walks over every object of
    torch, transformers and DeepSpeed: after one last collection the survivors are frozen, which takes
    1-2 s off every command on 2 cores (measured: the same time as os._exit). Unlike os._exit, atexit
    handlers, the joins of non-daemon threads and the flushing of open files all still happen."""
    gc.collect()
    gc.freeze()
    sys.exit(code)
