"""Several datasets as one: `dataset = ['a', 'b']` with `mix = 'proportional'` or `'temperature:T'`.

Each training window first picks a dataset (probability p_i), then a window of it as that dataset
would (random windows for text, whole blocks in epoch order for instruction data). With sizes n_i
in tokens, 'proportional' is p_i = n_i / sum(n), 'temperature:T' is p_i proportional to n_i^(1/T):
T = 1 is proportional, larger T moves towards equal shares (T -> infinity: uniform).

MixedData has TokenData's interface (names, meta, vocab_size, n_windows, windows, loss_tokens, draw,
eval_offsets, examples, epoch_sequences, check_vocab); an offset is global: dataset i's windows come after
those of datasets 0..i-1. The sampler (trainer/data/sampler.TrainSampler) counts the windows drawn from
each dataset, which the loop logs as the realised shares.
"""
import math
from dataclasses import replace

import numpy as np

from trainer.config import parse_mix
from trainer.data.tokens import TokenData, dataset_dir
from trainer.errors import UserError


def mix_probabilities(sizes, mix):
    """Sampling probability of each dataset: proportional to size^(1/T)."""
    temperature = parse_mix(mix)
    if temperature is None:
        raise UserError(f"mix={mix!r} is not 'proportional' or 'temperature:T' with T > 0, e.g. 'temperature:2'")
    logw = np.log(np.asarray(sizes, dtype=np.float64)) / temperature
    w = np.exp(logw - logw.max())
    return w / w.sum()


def open_data(cfg):
    """TokenData for one dataset, MixedData for a list of them."""
    if isinstance(cfg.dataset, str):
        return TokenData(dataset_dir(cfg), cfg.block_size)
    names = cfg.dataset
    if len(set(names)) != len(names):
        raise UserError(f"dataset={names!r} names a dataset twice; give each once (weights come from mix)")
    parts = [TokenData(dataset_dir(replace(cfg, dataset=name)), cfg.block_size) for name in names]
    return parts[0] if len(parts) == 1 else MixedData(parts, cfg.mix)


class MixedData:
    def __init__(self, parts, mix):
        kinds = {(p.meta.get("tokenizer", "gpt2"), p.meta.get("vocab_size")) for p in parts}
        if len(kinds) > 1:
            found = ", ".join(f"{p.names[0]}: {p.meta.get('tokenizer')} ({p.vocab_size})" for p in parts)
            raise UserError(f"the datasets of a mixture must share one tokenizer ({found}); "
                            f"prepare them all with the same --tokenizer")
        self.parts = parts
        self.names = [p.names[0] for p in parts]
        self.meta = parts[0].meta
        self.block_size = parts[0].block_size
        self.sizes = [len(p.tokens["train"]) for p in parts]  # tokens, padding of packed blocks included
        self.probs = mix_probabilities(self.sizes, mix)
        self.mix = mix
        self.packed = any(p.packed for p in parts)

    @property
    def vocab_size(self):
        return max(p.vocab_size for p in self.parts)

    def describe(self):
        return ", ".join(f"{n} {p:.3f} ({s:,} tokens)" for n, p, s in zip(self.names, self.probs, self.sizes))

    def _bases(self, split):
        return np.cumsum([0] + [p.n_windows(split) for p in self.parts])

    def n_windows(self, split):
        return int(self._bases(split)[-1])

    def windows(self, split, offsets):
        """The windows of global offsets, in order; position_ids for all when any dataset is packed."""
        import torch  # here, not at the top: launch/train.py opens the data before importing torch
        offsets = np.asarray(offsets)
        bases = self._bases(split)
        which = np.searchsorted(bases, offsets, side="right") - 1
        rows = [None] * len(offsets)
        for i, part in enumerate(self.parts):
            picked = np.nonzero(which == i)[0]
            if len(picked):
                batch = part.windows(split, offsets[picked] - bases[i])
                for j, k in enumerate(picked):
                    rows[k] = [t[j] for t in batch]
        T = self.block_size
        if self.packed:  # a text window is one example: positions 0..T-1
            rows = [r if len(r) == 3 else r + [torch.arange(T)] for r in rows]
        return tuple(torch.stack(column) for column in zip(*rows))

    def loss_tokens(self, split, offsets):
        """How many targets of the windows at global `offsets` carry loss (each dataset counts its own)."""
        offsets = np.asarray(offsets)
        bases = self._bases(split)
        which = np.searchsorted(bases, offsets, side="right") - 1
        return sum(part.loss_tokens(split, offsets[which == i] - bases[i]) for i, part in enumerate(self.parts))

    def examples(self, split):
        """The packed examples of every instruction dataset of the mixture, one dataset after another."""
        return [example for part in self.parts for example in part.examples(split)]

    def draw(self, rng, count, drawn, seed):
        """Pick a dataset for each window (one draw, the same on every rank), then its windows."""
        which = rng.choice(len(self.parts), size=count, p=self.probs)
        bases = self._bases("train")
        offsets = np.zeros(count, dtype=np.int64)
        for i, part in enumerate(self.parts):
            picked = np.nonzero(which == i)[0]
            if len(picked):
                own = [drawn[i]]
                local = part.draw(rng, len(picked), own, (seed, i + 1))
                offsets[picked] = np.asarray(local) + bases[i]
                drawn[i] = own[0]
        return offsets

    def eval_offsets(self, split, count, seed):
        """Each dataset's own fixed evaluation windows, in the mix's proportions (at least one each)."""
        bases = self._bases(split)
        out = []
        for i, part in enumerate(self.parts):
            n = max(1, round(count * self.probs[i]))
            out.append(part.eval_offsets(split, n, seed) + bases[i])
        return np.concatenate(out)

    def epoch_sequences(self):
        return sum(p.epoch_sequences() for p in self.parts)

    def check_vocab(self, model_vocab):
        for part in self.parts:
            part.check_vocab(model_vocab)


def epochs_to_iters(cfg, data):
    """max_epochs > 0: max_iters (and the cosine's lr_decay_iters) from the dataset's size.

    One epoch is data.epoch_sequences() sequences (all blocks of an instruction dataset, tokens /
    block_size of a text one, their sum for a mixture); an iteration takes batch_size x
    gradient_accumulation_steps of them. Returns (cfg, a line saying what was derived).
    """
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps
    per_epoch = data.epoch_sequences()
    iters = max(1, math.ceil(cfg.max_epochs * per_epoch / sequences))
    cfg = replace(cfg, max_iters=iters, lr_decay_iters=iters)
    line = (f"max_epochs={cfg.max_epochs:g}: {per_epoch:,.0f} sequences per epoch / {sequences} per iteration "
            f"-> max_iters={iters:,} (lr decays until then)")
    return cfg, line


def shares_line(sampler):
    """'data shares: a 0.503, b 0.497 (of 4,096 windows)'."""
    shares = sampler.shares()
    return "data shares: " + ", ".join(f"{n} {s:.3f}" for n, s in shares.items()) + \
        f" (of {sum(sampler.drawn):,} windows)"
