"""Saving a checkpoint, crash-safe and hashed as it is written.

A save goes to a hidden temporary tag first; only when every rank has written its part (and rank 0 a manifest
of every file's size and sha256) is it renamed to its final name and `latest` atomically replaced. The
checkpoint before it is kept until the next save, so a kill, a full disk or a damaged file at any moment leaves
a loadable checkpoint behind (trainer/run/checkpoint.py chooses it).

Every file goes through write_hashed: each rank hashes what it writes as it writes it (no second read), and
a failed write raises the OSError that says why (torch's zip writer would report its own message instead).
"""
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.os_errors import fix, reason, with_path
from trainer.run.checkpoint import (INFO, KEEP, MANIFEST, MANIFEST_FORMAT, TMP_PREFIX, check_manifest, checkpoint_dir,
                                    complete_tags, file_digest, folder_bytes, latest_tag)
from trainer.run.ranks import all_gather_objects, all_ranks_ok, rank


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


class HashingWriter:
    """A binary file that hashes what goes through it and keeps the first OSError of a write (torch's zip writer
    turns a failed write into its own RuntimeError, without the reason)."""

    def __init__(self, file):
        self.file, self.sha, self.size, self.error = file, hashlib.sha256(), 0, None

    def write(self, data):
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self):
        self.file.flush()


def write_hashed(path, write):
    """write(file) into `path`, flushed to disk; returns (bytes, sha256). A refused write raises its OSError."""
    with open(path, "wb") as f:
        out = HashingWriter(f)
        try:
            write(out)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as exc:
            if out.error is not None:
                raise with_path(out.error, path) from None
            raise with_path(exc, path)
    return out.size, out.sha.hexdigest()


class HashedSaves:
    """DeepSpeed's checkpoint engine with every file written through write_hashed: `written` holds the size and
    checksum of each file this rank saved."""

    def __init__(self, inner):
        self.inner, self.written = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path):
        self.written[str(path)] = write_hashed(path, lambda f: self.inner.save(state_dict, f))


def hashed_saves(engine):
    """The engine's checkpoint engine, wrapped once (its plain torch.save accepts a file object)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        engine.checkpoint_engine = current = HashedSaves(current)
    return current if isinstance(current, HashedSaves) else None


def write_manifest(folder, streamed):
    """Every file's size and sha256, from `streamed` ({name: (bytes, sha256)} hashed while written) or read back
    (files DeepSpeed copies, info.json), fsynced first; written last, atomically."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if not path.is_file() or name == MANIFEST:
            continue
        size = path.stat().st_size
        if name in streamed and streamed[name][0] == size:
            files[name] = {"bytes": size, "sha256": streamed[name][1]}
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": size, "sha256": file_digest(path)}
    atomic_write(folder / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def save(engine, out_dir, iter_num, client_state, adapters_only=False):
    """Save a checkpoint of iteration iter_num; returns its folder and size in bytes."""
    root = checkpoint_dir(out_dir)
    tag = f"iter{iter_num:07d}"
    tmp_tag = TMP_PREFIX + tag
    error = None
    if rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = exc
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    parts = {}
    if all_ranks_ok(error is None):  # the folder exists before anyone writes into it
        parts = write_parts(engine, root, tmp_tag, client_state, adapters_only)
        if isinstance(parts, BaseException):
            error, parts = parts, {}
    if all_ranks_ok(error is None):
        streamed = {}  # every rank's files, hashed as they were written
        for part in all_gather_objects(parts):
            streamed.update(part)
        if rank() == 0:
            try:
                plan = client_state["plan"]
                atomic_write(root / tmp_tag / INFO, json.dumps(
                    {"iter_num": iter_num, "world_size": plan["n_devices"], "zero_stage": plan["zero_stage"],
                     "engine_zero_stage": engine.zero_optimization_stage(), "mode": plan["mode"],
                     "optimizer": plan["optimizer"], "grad_accum_dtype": plan["grad_accum_dtype"],
                     # what saved_deepspeed_path needs to know which DeepSpeed path wrote the files
                     "dtype": plan["dtype"], "offload": plan["offload"], "master_weights": plan["master_weights"],
                     "optimizer_in_backward": plan["optimizer_in_backward"]}))
                write_manifest(root / tmp_tag, streamed)
            except OSError as exc:
                error = exc
    if not all_ranks_ok(error is None):
        if rank() == 0:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        raise UserError(save_failure(out_dir, iter_num, error))
    if rank() == 0:
        final = root / tag
        if final.exists():  # the same iteration saved before (a resume from an older checkpoint got here again)
            set_aside_or_remove(final)
        os.rename(root / tmp_tag, final)
        atomic_write(root / "latest", tag)
        # older checkpoints go only once the new one is `latest`; newer ones (left by a resume from an older
        # checkpoint: damaged, or passed over on purpose) wait until a save of their iteration
        older = [t for t in complete_tags(out_dir) if t < tag]
        for old in older[:max(0, len(older) - (KEEP - 1))]:
            shutil.rmtree(root / old, ignore_errors=True)
        # saves a kill interrupted, and universal conversions of older checkpoints
        for leftover in [*root.glob(TMP_PREFIX + "*"), *root.glob("*_universal")]:
            shutil.rmtree(leftover, ignore_errors=True)
    all_ranks_ok(True)
    return root / tag, folder_bytes(root / tag)


def write_parts(engine, root, tmp_tag, client_state, adapters_only):
    """This rank's files of a save: {name: (bytes, sha256)}, or the exception that stopped it."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    # Plain data parallelism (no tensor/pipeline slices) is all the universal converter needs to know.
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    saver = hashed_saves(engine)
    written = saver.written if saver is not None else {}
    written.clear()
    folder = root / tmp_tag
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=adapters_only)
        # Dropout and other RNG streams differ by rank, so every rank keeps its own.
        rng_file = folder / f"rng_rank{rank()}.pt"
        written[str(rng_file)] = write_hashed(rng_file, lambda f: torch.save(rng_state(), f))
    except (OSError, RuntimeError) as exc:  # a full disk: the OSError (write_hashed), or another writer's error
        return exc
    return {str(Path(path).relative_to(folder)): entry for path, entry in written.items()}


def save_failure(out_dir, iter_num, error):
    """The line of a save that failed on some rank (`error`: this rank's, or None)."""
    root = checkpoint_dir(out_dir)
    previous = latest_tag(out_dir)
    kept = f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint exists"
    if isinstance(error, OSError):
        why, what_to_do = reason(error), fix(error)
    else:
        why = str(error).splitlines()[0] if error else "another rank failed to write its part"
        what_to_do = f"check that {root} is writable with room to spare (df -h)"
    return (f"could not save the checkpoint of iteration {iter_num} ({why}); {kept}; {what_to_do}, then continue "
            f"with --init_from=resume")


def set_aside_or_remove(folder):
    """An existing checkpoint a new save of its iteration replaces: removed if intact, moved aside if damaged."""
    problem = check_manifest(folder)
    if problem is None:
        shutil.rmtree(folder)
        return
    aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(folder, aside)
    print(f"warning: the damaged checkpoint {folder} ({problem}) was moved aside to {aside}", file=sys.stderr)
