"""Instruction records: reading JSON/JSONL files of them, checking each, rendering it with a template into
prompt and response pieces, and tokenizing those into ids and a loss mask.

Alpaca records {'instruction', 'input' (optional), 'output'} and chat records {'messages': [{'role',
'content'}]}; a record that cannot be used raises InvalidRecord with what is wrong with it, which the
preparation reports with its file and line (or skips, with --skip_invalid).
"""
import json
from pathlib import Path

from trainer.errors import UserError
from trainer.prepare.utf8 import BOM, decode_utf8, read_utf8
from trainer.prepare.templates import instruction_prompt


class InvalidRecord(Exception):
    """One record that cannot be used; the message says what is wrong with it."""


def read_records(path):
    """[(where, record)] from a JSON list or JSONL file; `where` is 'index N' or 'line N'.

    A line of JSONL that is not JSON comes back as (where, InvalidRecord) so --skip_invalid can drop it.
    """
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
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


def iter_records(path):
    """(where, record) of a JSON list file, or (where, line text) of a JSONL file, one line at a time.

    JSONL lines are parsed by the workers (render_batch), so a broken line can be skipped with the
    other invalid records; a JSON list is read whole (write JSONL for large sets).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(BOM)
    if head.lstrip().startswith(b"["):
        yield from read_records(path)
        return
    n, offset = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            text = decode_utf8(raw, path, offset)
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            for line in text.splitlines() or [""]:
                n += 1
                if line.strip():
                    yield f"line {n}", line
