"""Loss and perplexity of a model on a prepared dataset's val split or on a raw text file.

Perplexity is exp(mean token loss). Every target is counted once:
- a token stream (a text dataset's val.bin, or a text file tokenized with the model's tokenizer) is cut
  into consecutive windows of block_size + 1 tokens overlapping by one (inputs t[kT : kT+T], targets
  t[kT+1 : kT+T+1]; the last window may be shorter), so every token but the first is predicted once,
  with up to block_size tokens of context;
- an instruction dataset is evaluated on all its val blocks with the training masking: only response
  tokens (and their end-of-text) count, each packed example sees only itself.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.tokenizer import IGNORE_INDEX
from trainer.model.loss import LMWithLoss


@dataclass
class EvalResult:
    loss: float  # mean token loss (nats)
    tokens: int  # targets that counted

    @property
    def perplexity(self):
        return math.exp(self.loss)


@torch.no_grad()
def _run(lm, batches, device):
    """Sum of token losses over (x, y[, position_ids]) batches, through the training loss."""
    model = LMWithLoss(lm).to(device).eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        x, y, *pos = [t.to(device) for t in batch]
        n = int((y != IGNORE_INDEX).sum())
        if n:
            loss_sum += float(model(x, y, *pos)) * n
            count += n
    return EvalResult(loss_sum / max(count, 1), count)


def stream_batches(tokens, block_size, batch_size):
    """(x, y) batches of consecutive windows covering a token stream (see the module docstring)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = list(range(0, len(tokens) - 1, block_size))
    full = [s for s in starts if s + block_size + 1 <= len(tokens)]
    for i in range(0, len(full), batch_size):
        rows = np.stack([tokens[s:s + block_size + 1] for s in full[i:i + batch_size]])
        yield torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    if len(full) < len(starts):  # the shorter last window
        row = tokens[starts[-1]:][None]
        yield torch.from_numpy(row[:, :-1]), torch.from_numpy(row[:, 1:])


def evaluate_stream(lm, tokens, block_size, batch_size=8, device="cpu"):
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to evaluate")
    return _run(lm, stream_batches(tokens, block_size, batch_size), device)


def evaluate_dataset(lm, data, batch_size=8, device="cpu", split="val"):
    """A prepared dataset (trainer/data/tokens.TokenData): all packed blocks, or the whole token stream."""
    if not data.packed:
        return evaluate_stream(lm, data.tokens[split], data.block_size, batch_size, device)
    n = data.n_windows(split)
    batches = (data.windows(split, np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size))
    return _run(lm, batches, device)


@torch.no_grad()
def continuation_logprob(lm, context, continuation, device="cpu"):
    """log P(continuation | context), summed over the continuation's tokens (lists of ids), through the
    training loss (LMWithLoss with the context's targets masked): the score by which multiple-choice
    benchmarks rank their choices (lm-evaluation-harness's loglikelihood requests); docs/instructions.md."""
    ids = torch.tensor([list(context) + list(continuation)], device=device)
    targets = ids[:, 1:].clone()
    targets[:, :len(context) - 1] = IGNORE_INDEX
    mean = LMWithLoss(lm).to(device).eval()(ids[:, :-1], targets)
    return -float(mean) * len(continuation)
