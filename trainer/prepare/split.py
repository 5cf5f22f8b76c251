"""The one train/val split of a preparation: which documents (or instruction examples) go to val.

round(n x val_fraction) of the n items, at least one and at most n - 1, drawn by the seed; each split
keeps its items in input order. One text document is split by characters instead (nanoGPT's rule:
the last val_fraction of it, trainer/prepare/corpus.py).
"""
import numpy as np

from trainer.errors import UserError


def check_val_fraction(val_fraction: float) -> None:
    """data/prepare.py's --val_fraction, checked once there before any input is read."""
    # Both splits must exist: the trainer evaluates on val.bin.
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def val_indices(n: int, val_fraction: float, seed: int, what: str = "item") -> np.ndarray:
    """The sorted indices of the validation items: round(n x val_fraction) of them (1 to n - 1), drawn by seed."""
    if n < 2:
        raise UserError(f"{n} {what}(s); need at least 2 (one for training, one for val)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, size=n_val, replace=False))


def split_indices(n: int, val_fraction: float, seed: int, what: str = "item") -> tuple[list[int], list[int]]:
    """(train indices, val indices), each in input order."""
    val = val_indices(n, val_fraction, seed, what)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val).tolist(), val.tolist()

