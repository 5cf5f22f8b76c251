"""A prepared dataset: data/<dataset>/{train,val}.bin memory-mapped, nanoGPT style (random windows).

Instruction datasets (meta format 'instructions', written by trainer/prepare/instructions.py) are
packed: whole blocks of block_size + 1 tokens, drawn each epoch in a fresh seeded order, and a batch is
(x, y, position_ids) instead of (x, y); positions restart at 0 at each packed example. A list of
datasets is mixed by trainer/data/mixing.MixedData, which has the same interface; the sampler
(trainer/data/sampler.py) draws an iteration's windows from either.
"""
import functools
import sys
from pathlib import Path

import numpy as np

from trainer.errors import UserError
from trainer.data.meta import has_meta, read_meta_file
from trainer.data.tokenizer import GPT2_EOT, IGNORE_INDEX


def dataset_dir(cfg):
    """data_dir/<dataset>; for a mixture (a list of datasets) the first one's."""
    name = cfg.dataset if isinstance(cfg.dataset, str) else cfg.dataset[0]
    return Path(cfg.data_dir) / name


# nanoGPT's shakespeare and openwebtext prepare scripts write train.bin/val.bin and no meta.pkl:
# GPT-2 BPE ids as uint16, which is how nanoGPT's train.py reads them too.
NANOGPT_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}


def read_meta(directory):
    """The dataset's meta dict (trainer/data/meta.py: a meta.pkl is read without running code)."""
    if not has_meta(directory) and (Path(directory) / "train.bin").is_file() and (Path(directory) / "val.bin").is_file():
        print(f"notice: {directory} has no meta.pkl; reading it as nanoGPT does: GPT-2 BPE ids, uint16",
              file=sys.stderr)
        return dict(NANOGPT_META)
    if not has_meta(directory):
        raise UserError(f"{Path(directory) / 'meta.pkl'} is missing; prepare the dataset first "
                        f"(python data/prepare.py --input=... --name={Path(directory).name})")
    return read_meta_file(directory, "prepare the dataset again")


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
        # Packed instruction datasets: whole blocks, and each token's position in its own example.
        self.packed = self.meta.get("format") == "instructions"
        if self.packed and self.meta["block_size"] != block_size:
            raise UserError(f"{self.directory} is packed for block_size={self.meta['block_size']}, not "
                            f"{block_size}; train with --block_size={self.meta['block_size']} or prepare it "
                            f"again with --block_size={block_size}")
        self.tokens = {split: self._open(split) for split in ("train", "val")}
        # Instruction datasets carry a loss mask (1 where the loss counts).
        self.masks = {split: self._open_mask(split) for split in ("train", "val")}
        self.positions = {split: self._open_mask(split, "pos", np.uint16) for split in ("train", "val")}
        self.names = [self.directory.name]

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

    def _open_mask(self, split, kind="mask", dtype=np.uint8):
        """{split}_mask.bin (or _pos.bin): one value per token, or None when the dataset has none."""
        path = self.directory / f"{split}_{kind}.bin"
        if not path.is_file():
            if self.meta.get("format") == "instructions":
                raise UserError(f"{path} is missing; prepare the instruction dataset again")
            return None
        values = np.memmap(path, dtype=dtype, mode="r")
        if len(values) != len(self.tokens[split]):
            raise UserError(f"{path} has {len(values)} entries for {len(self.tokens[split])} tokens (left from "
                            f"an earlier preparation?); prepare the dataset again")
        return values

    @property
    def vocab_size(self):
        return int(self.meta["vocab_size"])

    def n_windows(self, split):
        if self.packed:
            return len(self.tokens[split]) // (self.block_size + 1)
        return len(self.tokens[split]) - self.block_size

    def windows(self, split, offsets):
        """(x, y) int64 tensors for windows starting at `offsets`; masked targets -> IGNORE_INDEX.

        Packed data: `offsets` number whole blocks, and the batch is (x, y, position_ids).
        """
        import torch  # here, not at the top: launch/train.py opens the data before importing torch
        data, mask, T = self.tokens[split], self.masks[split], self.block_size
        starts = np.asarray(offsets) * (T + 1) if self.packed else offsets
        x = np.stack([data[i:i + T] for i in starts]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + T] for i in starts]).astype(np.int64)
        if mask is not None:
            m = np.stack([mask[i + 1:i + 1 + T] for i in starts])
            y[m == 0] = IGNORE_INDEX
        if not self.packed:
            return torch.from_numpy(x), torch.from_numpy(y)
        pos = np.stack([self.positions[split][i:i + T] for i in starts]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos)

    def loss_tokens(self, split, offsets):
        """How many targets of the windows at `offsets` carry loss: all of them without a mask, else the
        mask's ones (the sampler counts an iteration's loss tokens with this, trainer/data/sampler.py)."""
        mask, T = self.masks[split], self.block_size
        if mask is None:
            return len(offsets) * T
        starts = np.asarray(offsets) * (T + 1) if self.packed else offsets
        return sum(int(np.count_nonzero(mask[i + 1:i + 1 + T])) for i in starts)

    def examples(self, split):
        """[(prompt ids, response ids)] of each packed example of a split, in order: its last response (its
        last run of loss tokens) without the end-of-text, and everything before it (the prompt; a chat's
        earlier turns too). What launch/eval.py --generate and eval_generate ask and compare with."""
        if not self.packed:
            return []
        tokens, mask, positions = self.tokens[split], self.masks[split], self.positions[split]
        starts = np.append(np.flatnonzero(positions == 0), len(tokens))
        out = []
        for a, b in zip(starts[:-1], starts[1:]):
            carries = np.flatnonzero(mask[a:b])
            if not len(carries):  # the padding at the end of a block
                continue
            gaps = np.flatnonzero(np.diff(carries) > 1)  # where a run of loss tokens ends before another starts
            begin, end = a + carries[gaps[-1] + 1 if len(gaps) else 0], a + carries[-1] + 1
            response = tokens[begin:end].astype(np.int64).tolist()
            out.append((tokens[a:begin].astype(np.int64).tolist(),
                        response[:-1] if response[-1] == GPT2_EOT else response))
        return out

    def epoch_sequences(self):
        """Sequences in one pass over train.bin: its blocks (packed), else its tokens / block_size."""
        return self.n_windows("train") if self.packed else len(self.tokens["train"]) / self.block_size

    def draw(self, rng, count, drawn, seed):
        """`count` training offsets; `drawn` (a one-item list, the sampler's) counts them.

        Text: random windows, as nanoGPT. Packed: whole blocks, each epoch one seeded permutation,
        so every example is seen once per epoch.
        """
        if self.packed:
            key = seed if isinstance(seed, tuple) else (seed, 0)  # a mixture passes (seed, dataset number)
            offsets = epoch_order(self.n_windows("train"), drawn[0], count, key)
        else:
            offsets = rng.integers(0, self.n_windows("train"), size=count)
        drawn[0] += count
        return offsets

    def eval_offsets(self, split, count, seed):
        rng = np.random.Generator(np.random.PCG64([seed, 1 if split == "val" else 0]))
        if self.packed:  # whole blocks, each once: all of a split smaller than `count` blocks
            return rng.permutation(self.n_windows(split))[:count]
        return rng.integers(0, self.n_windows(split), size=count)

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


@functools.lru_cache(maxsize=8)
def _permutation(n, seed, epoch):
    return np.random.Generator(np.random.PCG64([*seed, epoch])).permutation(n)


def epoch_order(n, start, count, seed):
    """Items start .. start+count-1 of a stream that visits 0..n-1 once per epoch, in a seeded order."""
    out = []
    while len(out) < count:
        epoch, i = divmod(start + len(out), n)
        out.extend(_permutation(n, seed, epoch)[i:i + count - len(out)])
    return np.asarray(out, dtype=np.int64)
