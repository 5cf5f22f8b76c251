"""Packing instruction examples into blocks: best-fit decreasing, no example split across blocks.

Each block holds block_size + 1 tokens; every example's positions start at 0 (the trainer gives it its
own attention and position embeddings), and the rest of a block is padding: <|endoftext|> under mask 0,
its positions counting from 0 as one more (ignored) example.
"""
import bisect

import numpy as np


def pack(lengths, capacity):
    """Best-fit decreasing: lists of example indices, each list's lengths summing to <= capacity.

    No example is split; each goes into the fullest block that still has room for it.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    blocks, free = [], []  # free: sorted (room left, block number) of blocks that are not full
    for i in order:
        length = lengths[i]
        j = bisect.bisect_left(free, (length, -1))
        if j == len(free):
            blocks.append([i])
            room, b = capacity - length, len(blocks) - 1
        else:
            room, b = free.pop(j)
            blocks[b].append(i)
            room -= length
        if room > 0:
            bisect.insort(free, (room, b))
    return [sorted(block) for block in blocks]


def fill_blocks(blocks, capacity, pad_id, example):
    """Blocks of example numbers -> (tokens, mask, positions) arrays; example(i) gives (ids, mask) of number i.

    Each example's positions start at 0 (attention and position embeddings keep examples apart); the
    padding after the last example of a block counts as one more example, all under mask 0.
    """
    tokens = np.full(len(blocks) * capacity, pad_id, dtype=np.int64)
    mask = np.zeros(len(blocks) * capacity, dtype=np.uint8)
    positions = np.zeros(len(blocks) * capacity, dtype=np.uint16)
    for b, block in enumerate(blocks):
        at = b * capacity
        for i in block:
            ids, m = example(i)
            tokens[at:at + len(ids)] = ids
            mask[at:at + len(ids)] = m
            positions[at:at + len(ids)] = np.arange(len(ids))
            at += len(ids)
        end = (b + 1) * capacity
        positions[at:end] = np.arange(end - at)
    return tokens, mask, positions


def layout(examples, capacity, pad_id):
    """Pack (ids, mask) examples held in memory into blocks of `capacity` tokens -> (tokens, mask, positions)."""
    return fill_blocks(pack([len(ids) for ids, _ in examples], capacity), capacity, pad_id, examples.__getitem__)
