"""A dataset's meta (tokenizer, vocabulary, token dtype, format) on disk, read without running code.

A run folder carries it as `meta.json` (trainer/run/run_dir.py). A dataset folder keeps nanoGPT's `meta.pkl`,
which nanoGPT's own tools unpickle and every nanoGPT dataset already has (and so does a character model's
export, for the same readers). The trainer reads meta.json where a folder has one, else meta.pkl through
DataUnpickler, which builds only what a meta dict is made of (dicts, lists, tuples, sets, strings, bytes,
numbers, booleans, None): a pickle naming any function or class is refused in one line, and nothing in it runs.
"""
import io
import json
import pickle
from pathlib import Path

from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.os_errors import is_refusal

META_JSON, META_PKL = "meta.json", "meta.pkl"


class CodeInPickle(pickle.UnpicklingError):
    """The pickle names a function or class (its dotted name is the message)."""


class DataUnpickler(pickle.Unpickler):
    """Every object a pickle builds other than plain data comes through find_class: none is given."""

    def find_class(self, module, name):
        raise CodeInPickle(f"{module}.{name}")


def has_meta(folder):
    return (Path(folder) / META_JSON).is_file() or (Path(folder) / META_PKL).is_file()


def meta_path(folder):
    """The file the meta is read from: meta.json where there is one, else meta.pkl."""
    folder = Path(folder)
    return folder / META_JSON if (folder / META_JSON).is_file() else folder / META_PKL


def read_meta_file(folder, fix):
    """The meta dict of a folder; a missing, damaged or code-carrying file is one line ending in `fix`."""
    path = meta_path(folder)
    try:
        if path.name == META_JSON:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(meta, dict) and isinstance(meta.get("itos"), dict):  # JSON keys are strings
                meta["itos"] = {int(i): ch for i, ch in meta["itos"].items()}
        else:
            meta = DataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
            raise ValueError("no vocab_size")
    except CodeInPickle as exc:
        raise UserError(f"{path} holds a Python object ({exc}), not a dataset's vocabulary: loading it could "
                        f"run code, so it is refused; {fix}") from None
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except Exception as exc:  # truncated, not JSON or a pickle, or not a meta dict: all mean "write it again"
        if is_refusal(exc):  # a file this user may not read is the OS's line (trainer/cli.run_main)
            raise
        raise UserError(f"{path} is unreadable or has no vocab_size; {fix}") from None
    return meta


def write_meta_json(folder, meta):
    """meta.json: the meta dict as JSON (a character vocabulary's integer keys become strings, read back as
    integers by read_meta_file)."""
    atomic_write(Path(folder) / META_JSON, json.dumps(meta, indent=1))
