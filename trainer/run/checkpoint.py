"""Checkpoints in DeepSpeed's own format, made crash-safe.

Layout under out_dir/checkpoints/: DeepSpeed tag folders `iterNNNNNNN/` and DeepSpeed's `latest`
file naming the newest. A save goes to a hidden temporary tag first; only when every rank has
written its part (and a manifest of file sizes) is it renamed to its final name and `latest`
atomically replaced. The previous checkpoint is kept until the next save, so a kill, a full
disk or a corrupt file at any moment leaves a loadable checkpoint behind.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.run.ranks import all_ranks_ok, rank

CHECKPOINT_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
INFO = "info.json"
KEEP = 2  # the newest checkpoint and the one before it


def checkpoint_dir(out_dir):
    return Path(out_dir) / CHECKPOINT_DIR


def latest_tag(out_dir):
    """The tag `latest` names, or None when the run has no complete checkpoint."""
    latest = checkpoint_dir(out_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_dir(out_dir) / tag).is_dir() else None


def complete_tags(out_dir):
    """Finished checkpoints, oldest first (temporary and universal folders excluded)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("iter")
                  and not p.name.endswith("_universal"))


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


def write_manifest(folder):
    """File sizes of a finished save, fsynced: loading checks them to catch truncated files."""
    sizes = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            sizes[str(path.relative_to(folder))] = path.stat().st_size
    atomic_write(Path(folder) / MANIFEST, json.dumps(sizes, indent=1))


def check_manifest(folder):
    """None if every file the manifest lists is present with its size, else what is wrong."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return "its manifest.json is missing"
    try:
        sizes = json.loads(manifest.read_text())
    except ValueError:
        return "its manifest.json is unreadable"
    for name, size in sizes.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def read_info(out_dir, tag):
    """What the trainer must know before building the engine: the saved ranks, ZeRO stage and mode."""
    return json.loads((checkpoint_dir(out_dir) / tag / INFO).read_text())


def save(engine, out_dir, iter_num, client_state, adapters_only=False):
    """Save a checkpoint of iteration iter_num; returns its folder and size in bytes."""
    root = checkpoint_dir(out_dir)
    tag = f"iter{iter_num:07d}"
    tmp_tag = TMP_PREFIX + tag
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    all_ranks_ok(True)  # the folder exists before anyone writes into it
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                              UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    # Plain data parallelism (no tensor/pipeline slices) is all the universal converter needs to know.
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=adapters_only)
        # Dropout and other RNG streams differ by rank, so every rank keeps its own.
        torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank()}.pt")
    except (OSError, RuntimeError) as exc:  # a full disk shows as either, depending on the writer
        error = exc
    if all_ranks_ok(error is None) and rank() == 0:
        try:
            plan = client_state["plan"]
            atomic_write(root / tmp_tag / INFO, json.dumps(
                {"iter_num": iter_num, "world_size": plan["n_devices"], "zero_stage": plan["zero_stage"],
                 # the fast bf16 path builds a ZeRO-0 plan as DeepSpeed ZeRO-1 (trainer/run/engine.py)
                 "engine_zero_stage": engine.zero_optimization_stage(), "mode": plan["mode"],
                 "optimizer": plan["optimizer"], "grad_accum_dtype": plan["grad_accum_dtype"]}))
            write_manifest(root / tmp_tag)
        except OSError as exc:
            error = exc
    if not all_ranks_ok(error is None):
        if rank() == 0:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        previous = latest_tag(out_dir)
        kept = f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint exists"
        reason = str(error).splitlines()[0] if error else "another rank failed to write"
        raise UserError(f"could not save the checkpoint of iteration {iter_num} ({reason}); {kept}; "
                        f"free disk space in {root} and continue with --init_from=resume")
    if rank() == 0:
        final = root / tag
        if final.exists():  # the same iteration saved again (e.g. on interrupt right after an eval)
            shutil.rmtree(final)
        os.rename(root / tmp_tag, final)
        atomic_write(root / "latest", tag)
        for old in complete_tags(out_dir)[:-KEEP]:  # older checkpoints go only once the new one is `latest`
            shutil.rmtree(root / old, ignore_errors=True)
        # saves a kill interrupted, and universal conversions of older checkpoints
        for leftover in [*root.glob(TMP_PREFIX + "*"), *root.glob("*_universal")]:
            shutil.rmtree(leftover, ignore_errors=True)
    all_ranks_ok(True)
    return root / tag, folder_bytes(root / tag)


def latest_tag_or_error(out_dir):
    """The latest complete checkpoint's tag, for reading a finished run (export, eval, sample)."""
    tag = latest_tag(out_dir)
    if tag is None:
        raise UserError(f"{out_dir} has no checkpoint yet; train longer than one eval_interval "
                        f"or set --always_save_checkpoint=True")
    return tag


def choose_tag(out_dir, tag=""):
    """The checkpoint to resume from (`latest` unless tag is given), verified against its manifest."""
    root = checkpoint_dir(out_dir)
    tag = tag or latest_tag(out_dir)
    if tag is None:
        raise UserError(f"init_from='resume' but {root} holds no complete checkpoint; "
                        f"start a new run without --init_from=resume")
    if not (root / tag).is_dir():
        raise UserError(f"resume_tag={tag!r}: no such checkpoint in {root}; "
                        f"choose one of {', '.join(complete_tags(out_dir)) or 'none'}")
    problem = check_manifest(root / tag)
    if problem:
        raise UserError(corrupt_message(out_dir, tag, problem))
    return tag


def corrupt_message(out_dir, tag, problem):
    others = [t for t in complete_tags(out_dir) if t != tag and check_manifest(checkpoint_dir(out_dir) / t) is None]
    fallback = (f"the previous good checkpoint is {others[-1]}: resume from it with --resume_tag={others[-1]}"
                if others else "no other good checkpoint exists; start a new run")
    return f"checkpoint {checkpoint_dir(out_dir) / tag} is corrupt ({problem}); {fallback}"


def load(engine, out_dir, tag, adapters_only=False, universal=False):
    """Load a checkpoint into the engine; returns the client state and restores this rank's RNG."""
    root = checkpoint_dir(out_dir)
    load_tag = f"{tag}_universal" if universal else tag
    try:
        load_path, client_state = engine.load_checkpoint(str(root), tag=load_tag,
                                                         load_module_strict=not adapters_only)
    except Exception as exc:  # unpickling errors of a damaged file come in many types
        raise UserError(corrupt_message(out_dir, tag, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")) from None
    if load_path is None:
        raise UserError(corrupt_message(out_dir, tag, "DeepSpeed could not load it"))
    rng_file = root / tag / f"rng_rank{rank()}.pt"
    if rng_file.is_file():  # a rank that did not exist in the saved run keeps its fresh seed
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def to_universal(out_dir, tag):
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (for another number of ranks)."""
    root = checkpoint_dir(out_dir)
    target = root / f"{tag}_universal"
    if rank() == 0 and not (target / "zero").is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        shutil.rmtree(target, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(root / tag), output_folder=str(target), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, no_strict=False,
                                  inject_missing_state=False))
    all_ranks_ok(True)
    return target


def strip_prefix(state_dict, prefix="lm."):
    """State dicts saved from LMWithLoss -> keys of the bare HF model."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def consolidated_state_dict(out_dir):
    """The latest checkpoint's full fp32 weights keyed as the bare HF model, ZeRO shards merged by
    DeepSpeed's own zero_to_fp32 (under ZeRO-3 the module file holds empty tensors)."""
    tag = latest_tag_or_error(out_dir)
    folder = checkpoint_dir(out_dir) / tag
    # Reading a checkpoint needs no accelerator: where DeepSpeed is first imported here (sample.py, eval.py,
    # export unpickle its objects), no GPU is probed and nothing is printed about it
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if list(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir(out_dir)), tag=tag)
    else:  # ZeRO stage 0: the module's weights are saved whole by rank 0
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in strip_prefix(state).items()}
