"""Loading a verified checkpoint into a DeepSpeed engine (a resume), through DeepSpeed's universal format
when the run now has another number of ranks or ZeRO stage."""
import os
import random
import shutil

import numpy as np
import torch

from trainer.errors import UserError
from trainer.os_errors import refusal_in
from trainer.run import safe_load
from trainer.run.checkpoint import TMP_PREFIX, checkpoint_dir, corrupt_message
from trainer.run.ranks import all_ranks_ok, rank


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(engine, out_dir, tag, adapters_only=False, universal=False):
    """Load a checkpoint into the engine; returns the client state and restores this rank's RNG."""
    root = checkpoint_dir(out_dir)
    load_tag = f"{tag}_universal" if universal else tag
    if universal:  # its files are read by DeepSpeed's own loader, with weights_only=False: checked first
        problem = safe_load.check_folder(root / load_tag)
        if problem:
            raise UserError(corrupt_message(out_dir, tag, f"its universal conversion {root / load_tag}: {problem}"))
    try:
        load_path, client_state = engine.load_checkpoint(str(root), tag=load_tag,
                                                         load_module_strict=not adapters_only)
    except Exception as exc:  # unpickling errors of a damaged file come in many types
        if refusal_in(exc) is not None:
            raise
        raise UserError(corrupt_message(out_dir, tag, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")) from None
    if load_path is None:
        raise UserError(corrupt_message(out_dir, tag, "DeepSpeed could not load it"))
    rng_file = root / tag / f"rng_rank{rank()}.pt"
    if rng_file.is_file():  # a rank that did not exist in the saved run keeps its fresh seed
        set_rng_state(safe_load.load(rng_file))
    return client_state


def to_universal(out_dir, tag):
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (for another number of ranks), into a temporary
    folder renamed when complete: a conversion cut short is never taken for a finished one."""
    root = checkpoint_dir(out_dir)
    target = root / f"{tag}_universal"
    if rank() == 0 and not target.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        tmp = root / f"{TMP_PREFIX}{tag}_universal"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(root / tag), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, no_strict=False,
                                  inject_missing_state=False))
        os.rename(tmp, target)
    all_ranks_ok(True)
    return target
