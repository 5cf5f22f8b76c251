"""Which rank this process is once torch.distributed runs, and the few collectives the run needs (a world of
one without them).

Global rank: once-per-run work (run files, TensorBoard, console, checkpoint renames). Per-node work (the
GPU index, loading a quantized base onto this node's GPU) uses the launcher's local rank
(trainer/launcher.py).
"""
import os

import torch
import torch.distributed as dist


def rank_and_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank():
    return rank_and_world()[0]


def collective_device():
    """Where a collective's tensors must live: this node's GPU under NCCL (which has no CPU tensors), else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj):
    """[every rank's obj], in global rank order (a world of one without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


def release_cpu_allreduce_buffer():
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce, once every rank has mapped it.

    With ranks on one machine and no GPU, deepspeed.init_distributed creates one 66 MiB shared-memory file
    per rank (deepspeed_allreduce_buffer_<uid>_<master addr>_<port>_<rank>), maps every rank's, and never
    unlinks them: each run would leave them in /dev/shm (RAM) until a reboot. The mappings outlive the name,
    so after a barrier (every rank has returned from the init, which opens all of them) each rank removes
    its own name; the memory is freed when the last rank exits, even one that is killed.
    """
    if not dist.is_initialized() or torch.cuda.is_available():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # none made (ranks on several machines, or no /dev/shm): nothing to release
        pass


def agree_any(flags, device):
    """Each flag true on every rank when it is true on any (one all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def all_reduce_sum(values, device):
    """Sums over ranks of a few floats (float64, one all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_ranks_ok(ok):
    """True only if every rank says ok: a failure on one rank must not leave the others waiting."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
