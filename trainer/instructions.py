"""Instruction data: prompt templates, reading Alpaca/chat records, loss masks and packing.

`python data/prepare.py --input=alpaca.json --name=myinstr --format=instructions` comes here.
Output (read by trainer/data.TokenData; docs/instructions.md describes it):
  <data_dir>/<name>/{train,val}.bin       token ids, whole blocks of block_size + 1 tokens
  <data_dir>/<name>/{train,val}_mask.bin  uint8, 1 where the loss counts: response tokens and their <|endoftext|>
  <data_dir>/<name>/{train,val}_pos.bin   uint16, each token's position in its own example (0 where one starts)
  <data_dir>/<name>/meta.pkl              {'tokenizer', 'vocab_size', 'dtype', 'format': 'instructions',
                                           'block_size', 'template', ...}
Examples are packed into blocks (best-fit decreasing) and never split across blocks; an example
longer than a block is truncated or dropped (--overlong). The rest of a block is padding: <|endoftext|>
tokens with mask 0, positions counting from 0 as one more (ignored) example. The trainer samples whole
blocks and gives each example its own positions and attention (see trainer/model.packed_causal_mask).
"""
import bisect
import json
import os
import pickle
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import textprep
from trainer.textprep import PrepareError
from trainer.tokenizer import Gpt2Tokenizer


# ---------------------------------------------------------------- prompt templates

@dataclass(frozen=True)
class Template:
    """prompt = header + instruction [+ input] + response marker; the response follows, then <|endoftext|>."""
    name: str
    header: str  # the preamble without an input (a chat's system message replaces it)
    header_input: str  # the preamble when the record has an input
    instruction: str  # format string with {instruction}
    input: str  # format string with {input}
    response: str  # what comes right before the response

    def prompt(self, instruction, input="", system=None, first=True):
        """The prompt text for one instruction (one user turn of a chat)."""
        if not first:
            header = ""
        elif system is not None:
            header = system + "\n\n"
        else:
            header = self.header_input if input else self.header
        text = header + self.instruction.format(instruction=instruction)
        if input:
            text += self.input.format(input=input)
        return text + self.response


TEMPLATES = {
    # Stanford Alpaca's PROMPT_DICT, character for character.
    "alpaca": Template(
        name="alpaca",
        header="Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n\n",
        header_input="Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n",
        instruction="### Instruction:\n{instruction}\n\n",
        input="### Input:\n{input}\n\n",
        response="### Response:\n",
    ),
    # The fewest tokens: the instruction, the input, a blank line after each, then the response.
    "plain": Template(name="plain", header="", header_input="", instruction="{instruction}\n\n",
                      input="{input}\n\n", response=""),
}


def instruction_prompt(template, instruction, input_text=""):
    """The prompt of an Alpaca record exactly as training renders it (sample.py asks with the same text).

    An input of only white space counts as none (the header without input), as in render().
    """
    return template.prompt(instruction, input_text if input_text and input_text.strip() else "")


def get_template(name, error=PrepareError):
    if name not in TEMPLATES:
        raise error(f"unknown prompt template {name!r}; choose {' or '.join(TEMPLATES)}")
    return TEMPLATES[name]


# ---------------------------------------------------------------- records

class InvalidRecord(Exception):
    """One record that cannot be used; the message says what is wrong with it."""


def read_records(path):
    """[(where, record)] from a JSON list or JSONL file; `where` is 'index N' or 'line N'.

    A line of JSONL that is not JSON comes back as (where, InvalidRecord) so --skip_invalid can drop it.
    """
    text = textprep.read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                               f"fix it, or write one JSON record per line (JSONL)") from None
        return [(f"index {i}", r) for i, r in enumerate(records)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"line {n}", InvalidRecord(f"not valid JSON ({e.msg} at column {e.colno})")))
    return out


def _string_field(record, field, where="", required=True, allow_empty=False):
    if field not in record:
        if required:
            raise InvalidRecord(f"missing field '{where}{field}'")
        return ""
    value = record[field]
    if value is None and not required:  # "input": null is common for "no input"
        return ""
    if not isinstance(value, str):
        raise InvalidRecord(f"field '{where}{field}' is {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise InvalidRecord(f"field '{where}{field}' is empty")
    return value


def render(record, template):
    """One record -> [(text, carries_loss)]; a piece with carries_loss is followed by <|endoftext|>.

    Alpaca: {'instruction', 'input' (optional), 'output'}. Chat: {'messages': [{'role', 'content'}]},
    an optional first system message, then user and assistant turns alternating, ending with the assistant.
    """
    if isinstance(record, InvalidRecord):
        raise record
    if not isinstance(record, dict):
        raise InvalidRecord(f"the record is a {type(record).__name__}, not a JSON object")
    if "messages" in record:
        return _render_chat(record["messages"], template)
    if "instruction" not in record and "output" not in record:
        raise InvalidRecord("missing field 'instruction' (or 'messages' for a chat record)")
    instruction = _string_field(record, "instruction")
    input_text = _string_field(record, "input", required=False, allow_empty=True)
    output = _string_field(record, "output")
    return [(instruction_prompt(template, instruction, input_text), False), (output, True)]


def _render_chat(messages, template):
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord("field 'messages' must be a non-empty list")
    system, pieces, expect = None, [], "user"
    for i, message in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(message, dict):
            raise InvalidRecord(f"messages[{i}] is a {type(message).__name__}, not an object")
        role = _string_field(message, "role", where)
        content = _string_field(message, "content", where, allow_empty=(role == "system"))
        if role == "system" and i == 0:
            system = content
        elif role not in ("user", "assistant", "system"):
            raise InvalidRecord(f"field '{where}role' is {role!r}, not system, user or assistant")
        elif role != expect:
            raise InvalidRecord(f"messages[{i}] is a {role} message where a {expect} message belongs "
                                f"(an optional system message first, then user and assistant alternating)")
        elif role == "user":
            pieces.append((template.prompt(content, system=system, first=not pieces), False))
            expect = "assistant"
        else:
            pieces.append((content, True))
            expect = "user"
    if expect != "user":
        raise InvalidRecord("the last message must be the assistant's (a response to learn)")
    return pieces


def tokenize(pieces, tok):
    """[(text, carries_loss)] -> (ids, mask); a response piece ends with <|endoftext|>, also under mask 1.

    Prompt and response are encoded separately, as at generation time (the prompt alone, then the
    model continues), so no BPE merge crosses the boundary.
    """
    ids, mask = [], []
    for text, loss in pieces:
        piece = tok.encode_ordinary(text) + ([tok.eot_token] if loss else [])
        ids += piece
        mask += [int(loss)] * len(piece)
    return ids, mask


# ---------------------------------------------------------------- packing

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


# ---------------------------------------------------------------- prepare (streamed)
#
# Records are rendered and tokenized by worker processes, a batch at a time, and each example's
# ids and mask go straight to temporary files; memory keeps only a few numbers per example
# (its length and place, about 40 bytes with the packing), never the examples themselves.
# The packed blocks are then written one batch at a time from those files. The output is the
# same, byte for byte, as packing all examples in memory (layout above).

RECORDS_PER_TASK = 2000
_WORKER = {}


def iter_records(path):
    """(where, record) of a JSON list file, or (where, line text) of a JSONL file, one line at a time.

    JSONL lines are parsed by the workers (render_batch), so a broken line can be skipped with the
    other invalid records; a JSON list is read whole (write JSONL for large sets).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(textprep.BOM)
    if head.lstrip().startswith(b"["):
        yield from read_records(path)
        return
    n, offset = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            text = textprep.decode_utf8(raw, path, offset)
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            for line in text.splitlines() or [""]:
                n += 1
                if line.strip():
                    yield f"line {n}", line


def _init_render(template_name):
    _WORKER.update(template=get_template(template_name), tok=Gpt2Tokenizer())


def render_batch(batch):
    """[(path, where, record or JSONL line, is_line)] -> [('ok', kind, ids, mask) or ('bad', problem)]."""
    out = []
    for path, where, item, is_line in batch:
        try:
            if is_line:
                try:
                    item = json.loads(item)
                except json.JSONDecodeError as e:
                    raise InvalidRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
            pieces = render(item, _WORKER["template"])
        except InvalidRecord as e:
            out.append(("bad", f"{path} {where}: {e}"))
            continue
        ids, mask = tokenize(pieces, _WORKER["tok"])
        out.append(("ok", "chat" if "messages" in item else "alpaca",
                    np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=np.uint8)))
    return out


def _batches(files):
    batch = []
    for path in files:
        for where, item in iter_records(path):
            batch.append((str(path), where, item, isinstance(item, str) and where.startswith("line")))
            if len(batch) >= RECORDS_PER_TASK:
                yield None, batch
                batch = []
    if batch:
        yield None, batch


def split_indices(n, val_fraction, seed):
    """A seeded shuffle of n examples, then the last val_fraction of them (at least one) for validation."""
    textprep.check_val_fraction(val_fraction)
    if n < 2:
        raise PrepareError(f"{n} usable example(s); need at least 2 (one for training, one for val)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[:-n_val], order[-n_val:]


def split_examples(examples, val_fraction, seed):
    """split_indices applied to a list of examples."""
    train, val = split_indices(len(examples), val_fraction, seed)
    return [examples[i] for i in train], [examples[i] for i in val]


class _Files:
    """Temp files in out_dir, renamed into place by commit() or deleted by abort() (with folders made for them)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.made = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        textprep.remove_stale_tmp(self.out_dir)
        self.tmps = {}

    def open(self, name):
        tmp = textprep.tmp_name(self.out_dir / name)
        self.tmps[name] = tmp
        return open(tmp, "xb")

    def commit(self, names, meta):
        for name in names:
            os.replace(self.tmps.pop(name), self.out_dir / name)
        textprep.atomic_write(self.out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))

    def abort(self):
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:
                break


def _write_blocks(store, order, lengths, mask_sums, capacity, pad_id, dtype, files, split):
    """Pack the examples `order` (indices into the store) and write {split}.bin, _mask.bin, _pos.bin."""
    tokens_all, masks_all, starts = store
    blocks = pack([int(lengths[i]) for i in order], capacity)

    def example(j):  # the j-th of `order`, read from the store
        a, n = int(starts[order[j]]), int(lengths[order[j]])
        return tokens_all[a:a + n], masks_all[a:a + n]

    outs = [files.open(f"{split}.bin"), files.open(f"{split}_mask.bin"), files.open(f"{split}_pos.bin")]
    try:
        for first in range(0, len(blocks), 1024):  # 1024 blocks at a time: memory stays bounded
            tokens, mask, positions = fill_blocks(blocks[first:first + 1024], capacity, pad_id, example)
            for f, arr in zip(outs, (tokens.astype(dtype), mask, positions)):
                f.write(memoryview(arr))
    finally:
        for f in outs:
            f.close()
    used = sum(int(lengths[i]) for i in order)
    return {"examples": len(order), "blocks": len(blocks), "tokens": len(blocks) * capacity, "used": used,
            "loss": sum(int(mask_sums[i]) for i in order)}


def prepare_instructions(input_spec, out_dir, template_name="alpaca", block_size=1024, val_fraction=0.1,
                         skip_invalid=False, overlong="truncate", seed=1337, tokenizer="gpt2", num_proc=None):
    """Read, render, tokenize, split, pack and write an instruction dataset, streamed; prints what it did."""
    if tokenizer != "gpt2":
        raise PrepareError("--format=instructions needs --tokenizer=gpt2 (every example ends with <|endoftext|>)")
    if overlong not in ("truncate", "drop"):
        raise PrepareError(f"unknown --overlong={overlong} (choose truncate or drop)")
    if not 8 <= block_size <= 65535:
        raise PrepareError(f"--block_size={block_size} must be between 8 and 65535")
    textprep.check_val_fraction(val_fraction)
    template = get_template(template_name)
    tok = Gpt2Tokenizer()
    capacity = block_size + 1
    out_dir = Path(out_dir)
    files = textprep.collect_files(input_spec)
    meta = {**textprep.make_meta(tok), "format": "instructions", "block_size": block_size, "template": template.name}

    store = None
    out = _Files(out_dir)
    try:
        # 1. every record, rendered and tokenized in order, appended to two temp files
        kinds, skipped, first_problem, too_long, lost = {"alpaca": 0, "chat": 0}, 0, None, 0, 0
        lengths, mask_sums = array("l"), array("l")
        with out.open("examples.ids") as ids_file, out.open("examples.mask") as mask_file:
            for _, results in textprep.run_tasks(_batches(files), num_proc or textprep.default_num_proc(),
                                                  (template.name,), _init_render, render_batch):
                for result in results:
                    if result[0] == "bad":
                        if not skip_invalid:
                            raise PrepareError(f"{result[1]}; fix the record or pass --skip_invalid to drop such records")
                        skipped += 1
                        first_problem = first_problem or result[1]
                        continue
                    _, kind, ids, mask = result
                    kinds[kind] += 1
                    if len(ids) > capacity:  # truncated (keeping the start) or dropped
                        too_long += 1
                        if overlong == "drop":
                            continue
                        ids, mask = ids[:capacity], mask[:capacity]
                        if not mask.any():  # the prompt alone fills the block: nothing left to learn
                            lost += 1
                            continue
                    ids_file.write(memoryview(ids))
                    mask_file.write(memoryview(mask))
                    lengths.append(len(ids))
                    mask_sums.append(int(mask.sum()))
        print(f"read {sum(kinds.values()):,} examples from {len(files)} file(s) "
              f"({kinds['alpaca']:,} alpaca, {kinds['chat']:,} chat), template {template.name}")
        if skipped:
            print(f"skipped {skipped:,} invalid record(s) (--skip_invalid); the first: {first_problem}")
        action = "dropped" if overlong == "drop" else "truncated to the block"
        print(f"longer than block_size + 1 = {capacity:,} tokens: {too_long:,} example(s), {action}"
              + (f"; {lost:,} dropped as no response token was left" if lost else ""))

        # 2. split, pack and write each split from the temp files
        train, val = split_indices(len(lengths), val_fraction, seed)
        lengths = np.frombuffer(lengths, dtype=np.int64) if lengths.itemsize == 8 else np.asarray(lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        store = (np.memmap(out.tmps["examples.ids"], dtype=np.uint16, mode="r"),
                 np.memmap(out.tmps["examples.mask"], dtype=np.uint8, mode="r"), starts)
        stats = {}
        for split, order in (("train", train), ("val", val)):
            st = _write_blocks(store, order, lengths, mask_sums, capacity, tok.eot_token, meta["dtype"], out, split)
            stats[split] = st
            print(f"{split}: {st['examples']:,} examples in {st['blocks']:,} blocks of {capacity:,} tokens = "
                  f"{st['tokens']:,} tokens; {100 * st['loss'] / st['tokens']:.1f}% carry loss, "
                  f"{100 * (1 - st['used'] / st['tokens']):.1f}% padding")
        meta["examples"] = {s: v["examples"] for s, v in stats.items()}
        store = None
        names = [f"{s}{k}.bin" for s in ("train", "val") for k in ("", "_mask", "_pos")]
        out.commit(names, meta)
        out.abort()  # the temp example files
    except BaseException:
        store = None
        out.abort()
        raise
    print(f"wrote {out_dir}/{{train,val}}.bin, {{train,val}}_mask.bin, {{train,val}}_pos.bin, meta.pkl; "
          f"train with --dataset={out_dir.name} --block_size={block_size}")
    return meta
