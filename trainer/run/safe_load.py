"""Checkpoint files read without running code from them.

A torch file is a pickle, and unpickling can call any function it names. Every checkpoint file is read with
torch.load(weights_only=True), which builds only tensors, containers and numbers, plus the few types named
below that DeepSpeed and this trainer store. A file naming anything else (a crafted `os.system`, say) is
refused in one line naming the file and what it holds; nothing in it runs.

DeepSpeed's own readers (its engine's checkpoint engine, ds_to_universal, zero_to_fp32) load with
weights_only=False, so a folder is checked here, file by file, before any of them touches it (check_folder,
called where a checkpoint is chosen: trainer/run/checkpoint.py). The check parses each file's pickle with its
tensors memory-mapped, not read, so it costs little beside the sha256 verification that precedes it.
"""
import importlib
import pickle
import zipfile
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.os_errors import is_refusal

# What a checkpoint of this trainer holds beyond tensors, containers and numbers: the RNG state of numpy
# (an ndarray of uint32, rebuilt through numpy's own reconstructor; the module is numpy._core from numpy 2 on),
# and DeepSpeed's loss scaler, ZeRO stage and BF16_Optimizer fragment addresses in its optimizer files.
ALLOWED = (
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)


def resolve(name):
    """The object a dotted name names, or None where its module is not installed (numpy.core on numpy 2)."""
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def refused(path, names):
    return UserError(f"{path} holds {', '.join(sorted(names))}, which is not checkpoint data: loading it could run "
                     f"code, so it is refused and nothing was loaded; use checkpoints only from a source you trust, "
                     f"or train the run again")


def unsafe_names(path):
    """The globals the file's pickle names that are not data (torch's own and ALLOWED excepted), read without
    unpickling; None for a file that is not a zip-format torch file (read by load's weights_only alone)."""
    if not zipfile.is_zipfile(path):
        return None
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - set(ALLOWED)


def load(path, mmap=False):
    """torch.load of a checkpoint file, on the CPU, weights only with ALLOWED admitted; a file holding anything
    else raises the UserError that names it. Other errors (a damaged file) are the caller's to report."""
    path = Path(path)
    names = unsafe_names(path)
    if names:
        raise refused(path, names)
    # deepspeed is imported only for a file that names one of its types (ZeRO optimizer files)
    with_deepspeed = names is None or names_deepspeed(path)
    allowed = [resolve(n) for n in ALLOWED if n.startswith("numpy") or with_deepspeed]
    try:
        with torch.serialization.safe_globals([obj for obj in allowed if obj is not None]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and names is not None)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise
        # a global the static scan could not see (built on the stack) or an opcode weights_only refuses
        found = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "got <class" in line]
        raise refused(path, [found[0] if found else "objects weights_only=True refuses"]) from None


def names_deepspeed(path):
    """The file's pickle names a DeepSpeed type (ALLOWED admits it)."""
    with zipfile.ZipFile(path) as zf:
        pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        return pkl is not None and b"deepspeed" in zf.read(pkl)


def check_folder(folder):
    """None if every torch file under the folder loads as data, else the problem as text (a damaged file).
    A file holding code is refused (UserError); an OS refusal is raised as it is."""
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            load(path, mmap=True)
        except UserError:
            raise
        except Exception as exc:  # a damaged file's errors come in many types
            if is_refusal(exc):
                raise
            return f"{path.name} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None
