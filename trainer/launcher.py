"""What the launcher told this process through its environment, readable before torch is imported.

`deepspeed`, torchrun, MPI and Slurm start the trainer's processes and say which one each is in
environment variables. Entry points read them before torch.distributed exists (to print an error
once, to choose one process or several); trainer/run/ranks.py answers the same questions once it runs.
"""
import os
import random
import socket
from pathlib import Path

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


def read_checkpoints_on_cpu():
    """For an entry point that reads checkpoints and trains nothing (sample.py, eval.py, merge_adapter.py):
    DeepSpeed, first imported later to merge ZeRO shards, takes its CPU accelerator, so no GPU is probed and
    nothing is printed about it. A DS_ACCELERATOR the user set stands."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def node_name():
    """This process's node as a console line names it: DeepSpeed's node rank (CROSS_RANK) and the host."""
    node = os.environ.get("CROSS_RANK")
    return f"node {node} ({socket.gethostname()})" if node is not None else socket.gethostname()


# Ports the trainer never picks for itself: the launchers' defaults (torchrun 29400, deepspeed and
# torch 29500), so that a run started without a launcher never blocks a user's default launch.
LAUNCHER_DEFAULT_PORTS = range(29400, 29501)
PORT_FLOOR = 20000  # below it lie the well-known and many registered services' ports


def ephemeral_ports():
    """The range the OS hands out for outgoing connections and `bind(0)` (Linux's ip_local_port_range)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def port_is_free(port):
    """Nothing listens on the port, on any address (TCPStore's server binds them all)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def free_port(rng=random):
    """A free TCP port for a launch's rendezvous, outside the OS's ephemeral range.

    `bind(0)` then close hands back an ephemeral port, which any process's next outgoing connection
    may take before the run binds it (parallel launches failed now and then with EADDRINUSE). A port
    below the ephemeral range is never handed out by the OS; only another launch picking the same
    number at random could collide, and the caller retries on EADDRINUSE.
    """
    ephemeral = ephemeral_ports()
    candidates = [p for p in range(PORT_FLOOR, min(ephemeral.start, 65536))
                  if p not in LAUNCHER_DEFAULT_PORTS] or list(range(ephemeral.stop, 65536))
    for _ in range(200):
        port = rng.choice(candidates) if candidates else 0
        if port == 0:
            break
        if port_is_free(port):
            return port
    with socket.socket() as s:  # no port outside the ephemeral range is free: let the OS choose
        s.bind(("", 0))
        return s.getsockname()[1]


def is_port_in_use(exc):
    """A torch.distributed error raised because the rendezvous port is taken (EADDRINUSE)."""
    return "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower()


# PyTorch's caching allocator without expandable segments is reported to reserve 1.1 to 2x what it allocates once
# tensors of changing sizes fragment it (PyTorch's CUDA semantics notes, "Optimizing memory usage with
# PYTORCH_CUDA_ALLOC_CONF"); with them a segment grows in place. Read when CUDA's allocator starts, so the entry
# points set it before anything touches CUDA. PYTORCH_ALLOC_CONF is its newer name (torch 2.9+, read first).
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments(environ=os.environ):
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set either variable; returns the
    allocator setting the run uses (the user's, or ours)."""
    for name in ALLOC_CONF_VARIABLES:
        if name in environ:
            return f"{name}={environ[name]}"
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return f"PYTORCH_CUDA_ALLOC_CONF={EXPANDABLE_SEGMENTS}"
