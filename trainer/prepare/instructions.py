"""Preparing instruction data: records -> rendered, tokenized, split, packed blocks with loss masks, streamed.

`python data/prepare.py --input=alpaca.json --name=myinstr --format=instructions` comes here.
Output (read by trainer/data/tokens.TokenData; docs/instructions.md describes it):
  <data_dir>/<name>/{train,val}.bin       token ids, whole blocks of block_size + 1 tokens
  <data_dir>/<name>/{train,val}_mask.bin  uint8, 1 where the loss counts: response tokens and their <|endoftext|>
  <data_dir>/<name>/{train,val}_pos.bin   uint16, each token's position in its own example (0 where one starts)
  <data_dir>/<name>/meta.pkl              {'tokenizer', 'vocab_size', 'dtype', 'format': 'instructions',
                                           'block_size', 'template', ...}
Examples are packed into blocks (trainer/prepare/packing.py) and never split across blocks; an example
longer than a block is truncated or dropped (--overlong).

Records are rendered and tokenized by worker processes, a batch at a time, and each example's ids and
mask go straight to scratch files; memory keeps only a few numbers per example (its length and place,
about 40 bytes with the packing), never the examples themselves. The packed blocks are then written one
batch at a time from those files. The output is the same, byte for byte, as packing all examples in
memory (packing.layout).
"""
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.cli import Rule
from trainer.data.tokenizer import Gpt2Tokenizer
from trainer.errors import UserError
from trainer.prepare.output import DatasetWriter, make_meta
from trainer.prepare.packing import fill_blocks, pack
from trainer.prepare.records import (KINDS, InvalidRecord, iter_records, missing_mapped_field, record_kind, render,
                                     tokenize)
from trainer.prepare.sources import collect_files
from trainer.prepare.split import split_indices
from trainer.prepare.templates import get_template
from trainer.prepare.workers import default_num_proc, run_tasks

RECORDS_PER_TASK = 2000
# data/prepare.py's --overlong and --block_size: an example longer than a block is truncated or dropped; a
# block's positions (each example's own, from 0) are stored as uint16 (_pos.bin).
OVERLONG = ("truncate", "drop")
BLOCK_SIZE = Rule(lambda v: 8 <= v <= 65535, "between 8 and 65535")
_WORKER = {}


def init_render(template_name, columns=None):
    _WORKER.update(template=get_template(template_name), tok=Gpt2Tokenizer(), columns=columns or {})


def render_batch(batch):
    """[(path, where, record or JSONL line, is_line)] -> [('ok', kind, ids, mask) or ('bad', problem)], or
    ('empty', problem) for a file with no record (where is None)."""
    out = []
    for path, where, item, is_line in batch:
        if where is None:
            out.append(("empty", f"{path} holds no instruction records (an empty JSON list, or no line of JSONL); "
                                 f"give it records, or leave it out of --input (docs/instructions.md: the formats)"))
            continue
        try:
            if is_line:
                try:
                    item = json.loads(item)
                except json.JSONDecodeError as e:
                    raise InvalidRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
            pieces = render(item, _WORKER["template"], _WORKER["columns"])
        except InvalidRecord as e:
            out.append(("bad", f"{path} {where}: {e}"))
            continue
        ids, mask = tokenize(pieces, _WORKER["tok"])
        out.append(("ok", record_kind(item, _WORKER["columns"]),
                    np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=np.uint8)))
    return out


def check_columns(path, where, item, columns):
    """A column map naming a field that the file's first record lacks is a mistake in the map (one line)."""
    if isinstance(item, str):
        try:
            item = json.loads(item)
        except json.JSONDecodeError:
            return  # a broken line is the record's problem, reported as such
    if not isinstance(item, dict):
        return
    missing = missing_mapped_field(item, columns)
    if missing:
        ours, theirs = missing
        fields = ", ".join(sorted(item)) or "none"
        raise UserError(f"--columns maps {ours!r} to {theirs!r}, but {path} {where} has no field {theirs!r} (its "
                        f"fields: {fields}); fix --columns")


def _batches(files, columns=None):
    batch = []
    for path in files:
        n = 0
        for where, item in iter_records(path):
            if n == 0 and columns:
                check_columns(path, where, item, columns)
            n += 1
            batch.append((str(path), where, item, isinstance(item, str) and where.startswith("line")))
            if len(batch) >= RECORDS_PER_TASK:
                yield None, batch
                batch = []
        if n == 0:  # reported in input order, after the records of the files before it
            batch.append((str(path), None, None, False))
    if batch:
        yield None, batch


def _write_blocks(store, order, lengths, mask_sums, capacity, pad_id, dtype, files, split):
    """Pack the examples `order` (indices into the store) and write {split}.bin, _mask.bin, _pos.bin."""
    tokens_all, masks_all, starts = store
    blocks = pack([int(lengths[i]) for i in order], capacity)

    def example(j):  # the j-th of `order`, read from the store
        a, n = int(starts[order[j]]), int(lengths[order[j]])
        return tokens_all[a:a + n], masks_all[a:a + n]

    names = [f"{split}.bin", f"{split}_mask.bin", f"{split}_pos.bin"]
    for name in names:
        files.open(name)
    for first in range(0, len(blocks), 1024):  # 1024 blocks at a time: memory stays bounded
        tokens, mask, positions = fill_blocks(blocks[first:first + 1024], capacity, pad_id, example)
        for name, arr in zip(names, (tokens.astype(dtype), mask, positions)):
            files.append(name, arr)
    for name in names:
        files.close(name)
    used = sum(int(lengths[i]) for i in order)
    return {"examples": len(order), "blocks": len(blocks), "tokens": len(blocks) * capacity, "used": used,
            "loss": sum(int(mask_sums[i]) for i in order)}


@dataclass
class ReadExamples:
    """What step 1 kept: per usable example its length and loss-token count (its tokens are in the scratch
    files), and the counts the report prints."""
    kinds: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    lengths: array = field(default_factory=lambda: array("l"))
    mask_sums: array = field(default_factory=lambda: array("l"))
    skipped: int = 0
    first_problem: str | None = None
    too_long: int = 0
    lost: int = 0  # truncated to the block with no response token left


def _read_examples(files, columns, template, capacity, overlong, skip_invalid, num_proc, out) -> ReadExamples:
    """Every record, rendered and tokenized in order by the workers, appended to two scratch files."""
    read = ReadExamples()
    out.open("examples.ids")
    out.open("examples.mask")
    for _, results in run_tasks(_batches(files, columns), num_proc or default_num_proc(),
                                init_render, (template.name, columns), render_batch):
        for result in results:
            if result[0] == "empty":
                raise UserError(result[1])
            if result[0] == "bad":
                if not skip_invalid:
                    raise UserError(f"{result[1]}; fix the record or pass --skip_invalid to drop such records")
                read.skipped += 1
                read.first_problem = read.first_problem or result[1]
                continue
            _, kind, ids, mask = result
            read.kinds[kind] += 1
            if len(ids) > capacity:  # truncated (keeping the start) or dropped
                read.too_long += 1
                if overlong == "drop":
                    continue
                ids, mask = ids[:capacity], mask[:capacity]
                if not mask.any():  # the prompt alone fills the block: nothing left to learn
                    read.lost += 1
                    continue
            out.append("examples.ids", ids)
            out.append("examples.mask", mask)
            read.lengths.append(len(ids))
            read.mask_sums.append(int(mask.sum()))
    out.close("examples.ids")
    out.close("examples.mask")
    return read


def _report_read(read: ReadExamples, input_spec, n_files, template, capacity, overlong):
    if not sum(read.kinds.values()):
        raise UserError(f"no instruction record in {input_spec}: all {read.skipped:,} record(s) are invalid (the "
                        f"first: {read.first_problem}); fix them, or name your fields with --columns")
    counts = ", ".join(f"{n:,} {kind}" for kind, n in read.kinds.items() if n)
    print(f"read {sum(read.kinds.values()):,} examples from {n_files} file(s) ({counts}), template {template.name}")
    if read.skipped:
        print(f"skipped {read.skipped:,} invalid record(s) (--skip_invalid); the first: {read.first_problem}")
    action = "dropped" if overlong == "drop" else "truncated to the block"
    print(f"longer than block_size + 1 = {capacity:,} tokens: {read.too_long:,} example(s), {action}"
          + (f"; {read.lost:,} dropped as no response token was left" if read.lost else ""))


def _write_splits(out, read: ReadExamples, val_fraction, seed, capacity, pad_id, dtype) -> dict:
    """Split the examples, pack and write each split from the scratch files; {split: examples}."""
    train, val = split_indices(len(read.lengths), val_fraction, seed, "usable example")
    lengths = np.frombuffer(read.lengths, dtype=np.int64) if read.lengths.itemsize == 8 else np.asarray(read.lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    store = (np.memmap(out.path("examples.ids"), dtype=np.uint16, mode="r"),
             np.memmap(out.path("examples.mask"), dtype=np.uint8, mode="r"), starts)
    examples = {}
    try:
        for split, order in (("train", train), ("val", val)):
            st = _write_blocks(store, order, lengths, read.mask_sums, capacity, pad_id, dtype, out, split)
            examples[split] = st["examples"]
            print(f"{split}: {st['examples']:,} examples in {st['blocks']:,} blocks of {capacity:,} tokens = "
                  f"{st['tokens']:,} tokens; {100 * st['loss'] / st['tokens']:.1f}% carry loss, "
                  f"{100 * (1 - st['used'] / st['tokens']):.1f}% padding")
    finally:
        store = None  # the memory maps closed before the scratch files are removed
    return examples


def prepare_instructions(input_spec, out_dir, template_name="alpaca", block_size=1024, val_fraction=0.1,
                         skip_invalid=False, overlong="truncate", seed=1337, tokenizer="gpt2", num_proc=None,
                         columns=None):
    """Read, render, tokenize, split, pack and write an instruction dataset, streamed; prints what it did.

    columns: records.parse_columns' map of our field names to the files' (None: the formats' own names).
    block_size (BLOCK_SIZE), overlong (OVERLONG) and val_fraction (split.check_val_fraction) are
    data/prepare.py's flags, checked there with the others before any input is read."""
    if tokenizer != "gpt2":
        raise UserError("--format=instructions needs --tokenizer=gpt2 (every example ends with <|endoftext|>)")
    template = get_template(template_name)
    tok = Gpt2Tokenizer()
    capacity = block_size + 1
    out_dir = Path(out_dir)
    files = collect_files(input_spec)
    meta = {**make_meta(tok), "format": "instructions", "block_size": block_size, "template": template.name}
    out = DatasetWriter(out_dir)
    try:
        read = _read_examples(files, columns, template, capacity, overlong, skip_invalid, num_proc, out)
        _report_read(read, input_spec, len(files), template, capacity, overlong)
        meta["examples"] = _write_splits(out, read, val_fraction, seed, capacity, tok.eot_token, meta["dtype"])
        out.commit(meta)  # the scratch example files are removed
    except BaseException:
        out.abort()
        raise
    print(f"wrote {out_dir}/{{train,val}}.bin, {{train,val}}_mask.bin, {{train,val}}_pos.bin, meta.pkl; "
          f"train with --dataset={out_dir.name} --block_size={block_size}")
    return meta
