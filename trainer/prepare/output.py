"""Writing a prepared dataset: every file under a temporary name, then all renamed into place together.

Corpus and instruction preparation both write through DatasetWriter. Until commit() the dataset
already in the folder (if any) is untouched; meta.pkl is replaced last, so it never describes files
of an older preparation; files of the folder's previous format that this one does not write (the masks
of an instruction dataset when plain text replaces it) are removed. abort() deletes the temporary
files and the folders made for them. Output contract (read by trainer/data/tokens.py):
  <data_dir>/<name>/train.bin, val.bin          token ids, dtype as in meta.pkl
  <data_dir>/<name>/{train,val}_{mask,pos}.bin  instruction datasets only (trainer/prepare/instructions.py)
  <data_dir>/<name>/meta.pkl                    {'tokenizer', 'vocab_size', 'dtype', ...}; 'stoi'/'itos'
                                                for characters
"""
import os
import pickle
from pathlib import Path

import numpy as np

from trainer.errors import UserError
from trainer.files import atomic_write, remove_stale_tmp, tmp_name
from trainer.lock import FolderLock
from trainer.signals import held

DATASET_FILES = tuple(f"{split}{kind}.bin" for split in ("train", "val") for kind in ("", "_mask", "_pos"))


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def make_meta(tok) -> dict:
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size)}
    if tok.name == "char":
        # Same keys as nanoGPT's shakespeare_char meta.pkl, so its tools read ours.
        meta.update(stoi=tok.stoi, itos=tok.itos)
    return meta


class DatasetWriter:
    """The files of one dataset folder under temporary names (see the module docstring)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        # One preparation per dataset folder (trainer/lock.py): the lock makes the folder, and on release removes
        # the folders it made if nothing was left in them. No heartbeat thread: workers are forked from this
        # process only while it has one thread (trainer/prepare/workers.py); append() refreshes it instead.
        self.lock = FolderLock(self.out_dir, "a preparation of this dataset", "prepare it under another --name",
                               heartbeat_thread=False).acquire()
        remove_stale_tmp(self.out_dir)
        self.tmps, self.files = {}, {}

    def open(self, name):
        """A new temporary file for `name` (a dataset file, or scratch space that commit() deletes)."""
        tmp = tmp_name(self.out_dir / name)
        self.tmps[name] = tmp
        self.files[name] = open(tmp, "xb")
        return self.files[name]

    def path(self, name):
        """Where `name` is being written (its temporary file)."""
        return self.tmps[name]

    def append(self, name, values, dtype=None):
        """Append an array to `name`; a full disk is one line that keeps the previous dataset."""
        self.lock.beat()
        arr = np.asarray(values)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        try:
            self.files[name].write(memoryview(np.ascontiguousarray(arr)))
        except OSError as e:
            raise UserError(f"could not write {self.tmps[name]} ({e.strerror}); free some disk space or pass "
                            f"--data_dir on a disk with room (the previous dataset is kept)") from None
        return len(arr)

    def close(self, name):
        try:
            self.files.pop(name).close()
        except OSError as e:
            raise UserError(f"could not write {self.tmps[name]} ({e.strerror}); free some disk space") from None

    def commit(self, meta):
        """Rename every dataset file written into place, remove the scratch files and the dataset files of
        an earlier format, then write meta.pkl."""
        for name in list(self.files):
            self.close(name)
        with held():  # all of the files replaced, or none: a signal waits until they are
            for name in DATASET_FILES:
                if name in self.tmps:
                    os.replace(self.tmps.pop(name), self.out_dir / name)
                else:
                    (self.out_dir / name).unlink(missing_ok=True)
            for tmp in self.tmps.values():
                tmp.unlink(missing_ok=True)
            self.tmps = {}
            atomic_write(self.out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))
        self.lock.release()

    def abort(self):
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)
        self.lock.release()  # and the folders it made, if empty
