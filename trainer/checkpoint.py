"""Checkpoints in DeepSpeed's own format, made crash-safe.

Layout under out_dir/checkpoints/: one DeepSpeed tag folder `iterNNNNNNN/` and DeepSpeed's
`latest` file naming it. A save goes to a hidden temporary tag first; only when every rank
has written its part is it renamed to its final name and `latest` atomically replaced, so
a kill at any moment leaves the previous checkpoint loadable.
"""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.errors import UserError

CHECKPOINT_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"


def checkpoint_dir(out_dir):
    return Path(out_dir) / CHECKPOINT_DIR


def latest_tag(out_dir):
    """The tag `latest` names, or None when the run has no complete checkpoint."""
    latest = checkpoint_dir(out_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_dir(out_dir) / tag).is_dir() else None


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path, text):
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder):
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save(engine, out_dir, iter_num, client_state, adapters_only=False):
    """Save a checkpoint of iteration iter_num; returns its folder and size in bytes."""
    root = checkpoint_dir(out_dir)
    tag = f"iter{iter_num:07d}"
    tmp_tag = TMP_PREFIX + tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=adapters_only)
    # Dropout and other RNG streams differ by rank, so every rank keeps its own.
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        _fsync_tree(root / tmp_tag)
        final = root / tag
        if final.exists():  # the same iteration saved again (e.g. on interrupt right after an eval)
            shutil.rmtree(final)
        os.rename(root / tmp_tag, final)
        atomic_write_text(root / "latest", tag)
        for old in root.iterdir():  # older checkpoints go only once the new one is `latest`
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    size = sum(p.stat().st_size for p in (root / tag).rglob("*") if p.is_file())
    return root / tag, size


def load(engine, out_dir, adapters_only=False):
    """Load `latest` into the engine; returns the client state and restores this rank's RNG."""
    tag = latest_tag(out_dir)
    if tag is None:
        raise UserError(f"init_from='resume' but {checkpoint_dir(out_dir)} holds no complete checkpoint; "
                        f"start a new run without --init_from=resume")
    root = checkpoint_dir(out_dir)
    load_path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not adapters_only)
    if load_path is None:
        raise UserError(f"checkpoint {root / tag} could not be loaded; it may be incomplete")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
