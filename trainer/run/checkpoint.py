"""Checkpoints in DeepSpeed's own format, made crash-safe and verified by content.

Layout under out_dir/checkpoints/: DeepSpeed tag folders `iterNNNNNNN/` and DeepSpeed's `latest` file
naming the newest. A save goes to a hidden temporary tag first; only when every rank has written its part
(and rank 0 a manifest of every file's size and sha256) is it renamed to its final name and `latest`
atomically replaced. The checkpoint before it is kept until the next save, so a kill, a full disk or a
damaged file at any moment leaves a loadable checkpoint behind.

Every file goes through write_hashed: each rank hashes what it writes as it writes it (no second read), and
a failed write raises the OSError that says why (torch's zip writer would report its own message instead).
A resume (choose_tag), an export and sample.py/eval.py (latest_tag_or_error) verify a checkpoint against
its manifest before loading it and take the newest one that verifies, saying in one line which they passed
over and why; a damaged checkpoint is never deleted (a later save of its iteration moves it aside).
"""
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.os_errors import fix, is_refusal, reason, refusal_in, with_path
from trainer.plan.memory import saved_deepspeed_path
from trainer.run.ranks import all_gather_objects, all_ranks_ok, rank

CHECKPOINT_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # {"format": 2, "files": {name: {"bytes", "sha256"}}}; format 1 was {name: bytes}
INFO = "info.json"
KEEP = 2  # the newest checkpoint and the one before it
TAG = re.compile(r"iter\d+")
HASH_THREADS = 4  # hashlib releases the GIL: files are verified in parallel


def checkpoint_dir(out_dir):
    return Path(out_dir) / CHECKPOINT_DIR


def latest_named(out_dir):
    """What `latest` says, or None when it is missing or unreadable."""
    try:
        return (checkpoint_dir(out_dir) / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        if is_refusal(exc):
            raise
        return None


def latest_tag(out_dir):
    """The newest checkpoint as the console names it: the tag `latest` names, else the newest folder (None if
    the run has none)."""
    tags = complete_tags(out_dir)
    named = latest_named(out_dir)
    return named if named in tags else (tags[-1] if tags else None)


def complete_tags(out_dir):
    """Finished checkpoints, oldest first (temporary, universal and moved-aside folders excluded)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.fullmatch(p.name))


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


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def manifest_entries(folder):
    """{name: (bytes, sha256 or None)} of a checkpoint's manifest, or the problem with it as text."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return "its manifest.json is missing"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
        files = entries["files"] if "files" in entries else entries  # format 1: {name: bytes}
        out = {}
        for name, entry in files.items():
            size, sha = (entry["bytes"], entry["sha256"]) if isinstance(entry, dict) else (entry, None)
            if not isinstance(size, int) or not (sha is None or isinstance(sha, str)) or ".." in Path(name).parts:
                raise ValueError(name)
            out[name] = (size, sha)
        return out
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
        return "its manifest.json is damaged"


def check_manifest(folder):
    """None if every file the manifest lists is there with its size and content, else what is wrong.

    An OS refusal (permission) is raised, not reported: it is no damage, and an older checkpoint is no fix."""
    folder = Path(folder)
    entries = manifest_entries(folder)
    if isinstance(entries, str):
        return entries
    for name, (size, _) in entries.items():  # sizes first: a missing or truncated file costs no reading
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    hashed = [name for name, (_, sha) in entries.items() if sha is not None]

    def digest(name):
        try:
            return file_digest(folder / name)
        except OSError as exc:
            if is_refusal(exc):
                raise
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(hashed)))) as pool:
        for name, found in zip(hashed, pool.map(digest, hashed)):
            if isinstance(found, OSError):
                return f"{name} cannot be read ({found.strerror or found})"
            if found != entries[name][1]:
                return f"{name} does not match its sha256 in manifest.json"
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
                     "dtype": plan["dtype"], "offload": plan["offload"], "master_weights": plan["master_weights"]}))
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


# ----------------------------------------------------------------------------- which checkpoint to read

def candidates(out_dir):
    """(tags to try, best first; lines about `latest`). The one `latest` names, then older ones, newest first;
    without a valid `latest`, every checkpoint newest first."""
    root = checkpoint_dir(out_dir)
    tags = complete_tags(out_dir)
    named = latest_named(out_dir)
    if named in tags:
        return [named] + [t for t in reversed(tags) if t < named], []
    if not (root / "latest").exists():
        return list(reversed(tags)), []
    if named and TAG.fullmatch(named):
        return list(reversed(tags)), [f"checkpoint {root / named}, which {root / 'latest'} names, is missing"]
    return list(reversed(tags)), [f"{root / 'latest'} is damaged"]


def newest_good(out_dir):
    """(the first candidate that verifies, or None; one line per checkpoint passed over and why)."""
    root = checkpoint_dir(out_dir)
    order, passed = candidates(out_dir)
    for tag in order:
        problem = check_manifest(root / tag)
        if problem is None:
            return tag, passed
        passed.append(f"checkpoint {root / tag} is damaged ({problem})")
    return None, passed


def good_tags(out_dir):
    root = checkpoint_dir(out_dir)
    return [t for t in complete_tags(out_dir) if check_manifest(root / t) is None]


def say_passed_over(passed, tag, verb):
    if passed and rank() == 0:
        print(f"warning: {'; '.join(passed)}: {verb} {tag} instead (nothing was deleted)", file=sys.stderr)


def no_good_checkpoint(out_dir, passed, fix_line):
    root = checkpoint_dir(out_dir)
    if complete_tags(out_dir):
        return UserError(f"no checkpoint in {root} is intact ({'; '.join(passed)}); they are kept as they are; "
                         f"start over with --init_from=scratch (or a model) and --overwrite=True, or choose another "
                         f"--out_dir")
    missing = f" ({passed[0]})" if passed else ""
    return UserError(f"{root} holds no complete checkpoint{missing}; {fix_line}")


def latest_tag_or_error(out_dir):
    """The checkpoint a reader of a finished run loads (export, eval, sample): the newest that verifies."""
    tag, passed = newest_good(out_dir)
    if tag is None:
        raise no_good_checkpoint(out_dir, passed, "train longer than one eval_interval or set "
                                                  "--always_save_checkpoint=True")
    say_passed_over(passed, tag, "using")
    return tag


def choose_tag(out_dir, tag=""):
    """The checkpoint to resume from, verified by content: `tag` if given, else the newest that verifies."""
    root = checkpoint_dir(out_dir)
    if tag:
        if tag not in complete_tags(out_dir):
            raise UserError(f"resume_tag={tag!r}: no such checkpoint in {root}; choose one of "
                            f"{', '.join(good_tags(out_dir)) or 'none'}")
        problem = check_manifest(root / tag)
        if problem:
            good = good_tags(out_dir)
            raise UserError(f"resume_tag={tag!r}: checkpoint {root / tag} is damaged ({problem}) and kept as it is; "
                            + (f"the good checkpoints are {', '.join(good)}: choose one with --resume_tag, or leave "
                               f"--resume_tag out to resume from the newest good one" if good else
                               "no other checkpoint is intact: start over with --overwrite=True"))
        return tag
    tag, passed = newest_good(out_dir)
    if tag is None:
        raise no_good_checkpoint(out_dir, passed, "start a new run without --init_from=resume")
    say_passed_over(passed, tag, "resuming from")
    return tag


def corrupt_message(out_dir, tag, problem):
    """A checkpoint that verified (or whose manifest holds sizes only) but that DeepSpeed could not load."""
    others = [t for t in good_tags(out_dir) if t != tag]
    fallback = (f"the previous good checkpoint is {others[-1]}: resume from it with --resume_tag={others[-1]}"
                if others else "no other good checkpoint exists; start a new run")
    return f"checkpoint {checkpoint_dir(out_dir) / tag} is damaged ({problem}); {fallback}"


def load(engine, out_dir, tag, adapters_only=False, universal=False):
    """Load a checkpoint into the engine; returns the client state and restores this rank's RNG."""
    root = checkpoint_dir(out_dir)
    load_tag = f"{tag}_universal" if universal else tag
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
        set_rng_state(torch.load(rng_file, weights_only=False))
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


def strip_prefix(state_dict, prefix="lm."):
    """State dicts saved from LMWithLoss -> keys of the bare HF model."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def consolidated_state_dict(out_dir, tag=None):
    """A checkpoint's full fp32 weights keyed as the bare HF model, ZeRO shards merged by DeepSpeed's own
    zero_to_fp32 (under ZeRO-3 the module file holds empty tensors). tag: one already verified, else the
    newest that verifies (latest_tag_or_error)."""
    tag = tag or latest_tag_or_error(out_dir)
    folder = checkpoint_dir(out_dir) / tag
    # Reading a checkpoint needs no accelerator: where DeepSpeed is first imported here (sample.py, eval.py,
    # export unpickle its objects), no GPU is probed and nothing is printed about it
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = read_info(out_dir, tag)
    if saved_deepspeed_path(info).optimizer == "bf16_optimizer":
        state = bf16_optimizer_state_dict(folder)
    elif list(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir(out_dir)), tag=tag)
    else:  # ZeRO stage 0: the module's weights are saved whole by rank 0
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in strip_prefix(state).items()}


def bf16_optimizer_state_dict(folder):
    """The fp32 master weights of a bf16 ZeRO-0 checkpoint. That plan runs DeepSpeed's BF16_Optimizer
    (trainer/plan/memory.deepspeed_path), whose files zero_to_fp32 refuses ("is not
    a zero checkpoint"). Each rank's file holds a slice of every parameter group flattened in the order of the
    model file's param_shapes (padding at the end); frozen weights and buffers are the module's own (an adapter
    checkpoint has none), and tied weights (lm_head) point to the tensor they share."""
    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    files = sorted(folder.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(re.search(r"_pp_rank_(\d+)_", f.name)[1]))  # in rank order
    slices = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              ["single_partition_of_fp32_groups"] for f in files]
    state = dict(model["module"])
    for group, shapes in enumerate(model["param_shapes"]):
        flat, start = torch.cat([rank_slices[group] for rank_slices in slices]), 0
        for name, shape in shapes.items():
            state[name] = flat[start:start + shape.numel()].view(shape)
            start += shape.numel()
    for alias, name in model.get("shared_params", {}).items():
        if name in state:  # an adapter checkpoint leaves the frozen base (and its ties) out
            state[alias] = state[name]
    return state
