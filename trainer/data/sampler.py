"""The training sampler: every window of an iteration drawn once, identically on every rank.

One global draw per iteration, the same on all ranks, of which each rank takes its slice: the data
stream does not depend on the number of ranks or on the micro-batch, and its state is one small dict
that the checkpoint saves. Each rank also knows how many loss tokens the whole iteration holds, which
token-weighted updates need (trainer/model/loss.token_weight).
"""
from typing import NamedTuple

import numpy as np


class Iteration(NamedTuple):
    batches: list      # this rank's micro-batches: (x, y) or (x, y, position_ids) tensors
    loss_tokens: int   # targets that carry loss in the whole iteration: every micro-batch of every rank


class TrainSampler:
    """Random training windows for one iteration: the same draw on every rank."""

    def __init__(self, data, seed):
        self.data = data
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = [0] * len(data.names)  # windows drawn so far from each dataset (of a mixture)

    def iteration(self, sequences, rank, world_size, micro):
        """This rank's micro-batches of one iteration (`sequences` windows shared out by rank), and the loss
        tokens of all of them: every rank draws every window, so each counts the total without communicating."""
        offsets = self.data.draw(self.rng, sequences, self.drawn, self.seed)
        per_rank = sequences // world_size
        mine = offsets[rank * per_rank:(rank + 1) * per_rank]
        batches = [self.data.windows("train", mine[i:i + micro]) for i in range(0, per_rank, micro)]
        return Iteration(batches, self.data.loss_tokens("train", offsets))

    def shares(self):
        """{dataset: its share of the windows drawn so far} (the realised mix)."""
        total = max(1, sum(self.drawn))
        return {name: n / total for name, n in zip(self.data.names, self.drawn)}

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "drawn": list(self.drawn)}

    def load_state_dict(self, state):
        if "rng" not in state:  # saved before mixing existed: the generator's state alone
            state = {"rng": state, "drawn": self.drawn}
        self.rng.bit_generator.state = state["rng"]
        if len(state["drawn"]) == len(self.drawn):
            self.drawn = list(state["drawn"])
