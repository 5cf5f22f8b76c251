"""What the launcher told this process through its environment, readable before torch is imported.

`deepspeed`, torchrun, MPI and Slurm start the trainer's processes and say which one each is in
environment variables. Entry points read them before torch.distributed exists (to print an error
once, to choose one process or several); trainer/run/ranks.py answers the same questions once it runs.
"""
import os
import socket

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


def local_rank():
    """This process's index on its node (the launcher's LOCAL_RANK; 0 without a launcher): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def node_name():
    """This process's node as a console line names it: DeepSpeed's node rank (CROSS_RANK) and the host."""
    node = os.environ.get("CROSS_RANK")
    return f"node {node} ({socket.gethostname()})" if node is not None else socket.gethostname()
