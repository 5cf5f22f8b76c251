"""Token batches from data/<dataset>/{train,val}.bin, nanoGPT style (random windows).

One global sampler draws every window of an iteration, identical on all ranks, and each
rank takes its slice: the data stream does not depend on the number of ranks, and its
state is one small dict that the checkpoint saves.
"""
import pickle
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.model import IGNORE_INDEX


def dataset_dir(cfg):
    return Path(cfg["data_dir"]) / cfg["dataset"]


def read_meta(directory):
    path = Path(directory) / "meta.pkl"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the dataset first "
                        f"(python data/prepare.py --input=... --name={Path(directory).name})")
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
        int(meta["vocab_size"])
    except Exception:  # truncated, not a pickle, or not our dict: all mean "prepare again"
        raise UserError(f"{path} is unreadable or has no vocab_size; prepare the dataset again") from None
    return meta


class TokenData:
    """The memory-mapped splits of one prepared dataset."""

    def __init__(self, directory, block_size):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserError(f"dataset folder {self.directory} does not exist; prepare it first "
                            f"(e.g. python data/shakespeare_char/prepare.py) or set --data_dir/--dataset")
        self.meta = read_meta(self.directory)
        self.block_size = block_size
        self.dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.tokens = {split: self._open(split) for split in ("train", "val")}
        # Instruction datasets carry a loss mask (1 where the loss counts).
        self.masks = {split: self._open_mask(split) for split in ("train", "val")}

    def _open(self, split):
        path = self.directory / f"{split}.bin"
        if not path.is_file():
            raise UserError(f"{path} is missing; run the dataset's prepare script again")
        size = path.stat().st_size
        if size % self.dtype.itemsize:
            raise UserError(f"{path} holds {size} bytes, not a whole number of {self.dtype} tokens; "
                            f"prepare the dataset again")
        if size // self.dtype.itemsize < self.block_size + 1:
            raise UserError(f"{path} has {size // self.dtype.itemsize} tokens, fewer than block_size + 1 = "
                            f"{self.block_size + 1}; use more text or a smaller --block_size")
        return np.memmap(path, dtype=self.dtype, mode="r")

    def _open_mask(self, split):
        path = self.directory / f"{split}_mask.bin"
        return np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None

    @property
    def vocab_size(self):
        return int(self.meta["vocab_size"])

    def n_windows(self, split):
        return len(self.tokens[split]) - self.block_size

    def windows(self, split, offsets):
        """(x, y) int64 tensors for windows starting at `offsets`; masked targets -> IGNORE_INDEX."""
        data, mask, T = self.tokens[split], self.masks[split], self.block_size
        x = np.stack([data[i:i + T] for i in offsets]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + T] for i in offsets]).astype(np.int64)
        if mask is not None:
            m = np.stack([mask[i + 1:i + 1 + T] for i in offsets])
            y[m == 0] = IGNORE_INDEX
        return torch.from_numpy(x), torch.from_numpy(y)

    def check_vocab(self, model_vocab):
        """Every token id must index the model's embedding table (an id past it crashes mid-run)."""
        if self.vocab_size > model_vocab:
            raise UserError(f"dataset {self.directory} has vocab_size {self.vocab_size} but the model has "
                            f"{model_vocab}; prepare the data with the model's tokenizer")
        for split, tokens in self.tokens.items():
            chunk = 1 << 24  # scan in pieces: the whole split need not fit in memory
            top = max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))
            if top >= model_vocab:
                raise UserError(f"{self.directory / (split + '.bin')} holds token id {top}, but the model's "
                                f"vocabulary has {model_vocab} ids; prepare the data with the model's tokenizer")


class TrainSampler:
    """Random training windows for one iteration: the same draw on every rank."""

    def __init__(self, data, seed):
        self.data = data
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def iteration_batches(self, sequences, rank, world_size, micro):
        """This rank's micro-batches of one iteration: `sequences` windows shared out by rank."""
        offsets = self.rng.integers(0, self.data.n_windows("train"), size=sequences)
        per_rank = sequences // world_size
        mine = offsets[rank * per_rank:(rank + 1) * per_rank]
        return [self.data.windows("train", mine[i:i + micro]) for i in range(0, per_rank, micro)]

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state


def eval_offsets(data, split, count, seed):
    """The fixed evaluation windows of a split: the same at every evaluation and any rank count."""
    rng = np.random.Generator(np.random.PCG64([seed, 1 if split == "val" else 0]))
    return rng.integers(0, data.n_windows(split), size=count)
