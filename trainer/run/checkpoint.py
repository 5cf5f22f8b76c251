"""Checkpoints in DeepSpeed's own format: where they are, and which one a reader may trust.

Layout under out_dir/checkpoints/: DeepSpeed tag folders `iterNNNNNNN/` and DeepSpeed's `latest` file
naming the newest, each folder with a manifest of every file's size and sha256 (written by
trainer/run/checkpoint_save.py). A resume (choose_tag), an export and sample.py/eval.py (latest_tag_or_error)
verify a checkpoint against its manifest before loading it and take the newest one that verifies, saying in
one line which they passed over and why; a damaged checkpoint is never deleted (a later save of its iteration
moves it aside). Loading into an engine: trainer/run/checkpoint_load.py; a finished run's fp32 weights:
trainer/run/consolidate.py.
"""
import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainer.errors import UserError
from trainer.os_errors import is_refusal
from trainer.run import safe_load
from trainer.run.ranks import rank

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


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def problem_with(folder):
    """None for a checkpoint a reader may load: every file as its manifest says, and every torch file data
    (trainer/run/safe_load.py: one holding code is refused with a UserError, never passed over)."""
    return check_manifest(folder) or safe_load.check_folder(folder)


def newest_good(out_dir):
    """(the first candidate that verifies, or None; one line per checkpoint passed over and why)."""
    root = checkpoint_dir(out_dir)
    order, passed = candidates(out_dir)
    for tag in order:
        problem = problem_with(root / tag)
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
        problem = problem_with(root / tag)
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
