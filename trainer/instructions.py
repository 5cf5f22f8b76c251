"""Instruction data: prompt templates, reading Alpaca/chat records, loss masks and packing.

`python data/prepare.py --input=alpaca.json --name=myinstr --format=instructions` comes here.
Output (read by trainer/data.TokenData; DESIGN's "Data" contract plus the positions):
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
import pickle
import random
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
    return [(template.prompt(instruction, input_text.strip() and input_text), False), (output, True)]


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


def layout(examples, capacity, pad_id):
    """Pack (ids, mask) examples into blocks of `capacity` tokens -> (tokens, mask, positions) arrays."""
    blocks = pack([len(ids) for ids, _ in examples], capacity)
    tokens = np.full(len(blocks) * capacity, pad_id, dtype=np.int64)
    mask = np.zeros(len(blocks) * capacity, dtype=np.uint8)
    positions = np.zeros(len(blocks) * capacity, dtype=np.uint16)
    for b, block in enumerate(blocks):
        at = b * capacity
        for i in block:
            ids, m = examples[i]
            tokens[at:at + len(ids)] = ids
            mask[at:at + len(ids)] = m
            positions[at:at + len(ids)] = np.arange(len(ids))
            at += len(ids)
        end = (b + 1) * capacity
        positions[at:end] = np.arange(end - at)  # padding: one more example, all under mask 0
    return tokens, mask, positions


# ---------------------------------------------------------------- prepare

def load_examples(files, template, tok, skip_invalid):
    """Every record of every file, rendered and tokenized; invalid ones raise or are counted."""
    examples, skipped, first_problem = [], 0, None
    kinds = {"alpaca": 0, "chat": 0}
    for path in files:
        for where, record in read_records(path):
            try:
                pieces = render(record, template)
            except InvalidRecord as e:
                problem = f"{path} {where}: {e}"
                if not skip_invalid:
                    raise PrepareError(f"{problem}; fix the record or pass --skip_invalid to drop such records") from None
                skipped += 1
                first_problem = first_problem or problem
                continue
            kinds["chat" if "messages" in record else "alpaca"] += 1
            examples.append(tokenize(pieces, tok))
    return examples, kinds, skipped, first_problem


def fit_examples(examples, capacity, overlong):
    """Examples longer than a block: truncated (keeping the start) or dropped. Returns (kept, long, lost)."""
    kept, too_long, lost = [], 0, 0
    for ids, mask in examples:
        if len(ids) > capacity:
            too_long += 1
            if overlong == "drop":
                continue
            ids, mask = ids[:capacity], mask[:capacity]
            if not any(mask):  # the prompt alone fills the block: nothing left to learn
                lost += 1
                continue
        kept.append((ids, mask))
    return kept, too_long, lost


def split_examples(examples, val_fraction, seed):
    """A seeded shuffle, then the last val_fraction of the examples (at least one) for validation."""
    textprep.check_val_fraction(val_fraction)
    if len(examples) < 2:
        raise PrepareError(f"{len(examples)} usable example(s); need at least 2 (one for training, one for val)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * val_fraction)))
    return [examples[i] for i in order[:-n_val]], [examples[i] for i in order[-n_val:]]


def write_instruction_dataset(out_dir, tok, splits, meta_extra):
    """{split}.bin, {split}_mask.bin, {split}_pos.bin, then meta.pkl last (it never describes old bins)."""
    meta = {**textprep.make_meta(tok), **meta_extra}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (tokens, mask, positions) in splits.items():
        textprep._atomic_write(out_dir / f"{split}.bin", tokens.astype(meta["dtype"]).tofile)
        textprep._atomic_write(out_dir / f"{split}_mask.bin", mask.tofile)
        textprep._atomic_write(out_dir / f"{split}_pos.bin", positions.tofile)
    textprep._atomic_write(out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))
    return meta


def prepare_instructions(input_spec, out_dir, template_name="alpaca", block_size=1024, val_fraction=0.1,
                         skip_invalid=False, overlong="truncate", seed=1337, tokenizer="gpt2"):
    """Read, render, tokenize, split, pack and write an instruction dataset; prints what it did."""
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

    files = textprep.collect_files(input_spec)
    examples, kinds, skipped, first_problem = load_examples(files, template, tok, skip_invalid)
    print(f"read {sum(kinds.values()):,} examples from {len(files)} file(s) "
          f"({kinds['alpaca']:,} alpaca, {kinds['chat']:,} chat), template {template.name}")
    if skipped:
        print(f"skipped {skipped:,} invalid record(s) (--skip_invalid); the first: {first_problem}")
    examples, too_long, lost = fit_examples(examples, capacity, overlong)
    action = "dropped" if overlong == "drop" else "truncated to the block"
    print(f"longer than block_size + 1 = {capacity:,} tokens: {too_long:,} example(s), {action}"
          + (f"; {lost:,} dropped as no response token was left" if lost else ""))
    train, val = split_examples(examples, val_fraction, seed)

    splits, stats = {}, {}
    for split, exs in (("train", train), ("val", val)):
        tokens, mask, positions = layout(exs, capacity, tok.eot_token)
        splits[split] = (tokens, mask, positions)
        used = sum(len(ids) for ids, _ in exs)
        stats[split] = {"examples": len(exs), "blocks": len(tokens) // capacity, "tokens": len(tokens)}
        print(f"{split}: {len(exs):,} examples in {len(tokens) // capacity:,} blocks of {capacity:,} tokens = "
              f"{len(tokens):,} tokens; {100 * mask.sum() / len(tokens):.1f}% carry loss, "
              f"{100 * (1 - used / len(tokens)):.1f}% padding")
    meta = write_instruction_dataset(Path(out_dir), tok, splits, {
        "format": "instructions", "block_size": block_size, "template": template.name,
        "examples": {s: v["examples"] for s, v in stats.items()}})
    print(f"wrote {out_dir}/{{train,val}}.bin, {{train,val}}_mask.bin, {{train,val}}_pos.bin, meta.pkl; "
          f"train with --dataset={Path(out_dir).name} --block_size={block_size}")
    return meta
