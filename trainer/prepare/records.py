"""Instruction records: reading JSON/JSONL files of them, checking each, rendering it with a template into
prompt and response pieces, and tokenizing those into ids and a loss mask.

Four kinds of record, told apart by their fields (docs/instructions.md):
- Alpaca {'instruction', 'input' (optional), 'output'};
- Dolly {'instruction', 'context' (optional), 'response'}: context is Alpaca's input;
- chat {'messages': [{'role', 'content'}]}: system (optional, first), then user and assistant alternating;
- ShareGPT {'conversations': [{'from', 'value'}]}: the same with the roles system, human and gpt.
Other field names are read through a column map (--columns, parse_columns): our field -> the file's. A record
that cannot be used raises InvalidRecord with what is wrong with it, which the preparation reports with its
file and line (or skips, with --skip_invalid).
"""
import json
from dataclasses import dataclass
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


KINDS = ("alpaca", "dolly", "chat", "sharegpt")
# The fields a column map may rename (our name -> the file's): Alpaca's three, and the message lists.
COLUMN_FIELDS = ("instruction", "input", "output", "messages", "conversations")
COLUMNS_EXAMPLE = '{"instruction": "question", "output": "answer"}'


@dataclass(frozen=True)
class ChatFormat:
    """Where a conversation keeps its turns: the list field, each turn's role and text keys, the role names."""
    field: str
    role: str
    content: str
    system: str
    user: str
    assistant: str


CHAT = ChatFormat("messages", "role", "content", "system", "user", "assistant")
SHAREGPT = ChatFormat("conversations", "from", "value", "system", "human", "gpt")


def parse_columns(text):
    """--columns: a JSON object {our field: the file's field} -> dict ({} for ''); one UserError line if not."""
    if not text:
        return {}
    fix = f"e.g. --columns='{COLUMNS_EXAMPLE}'"
    try:
        columns = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--columns={text} is not valid JSON ({e.msg} at column {e.colno}); write a JSON object "
                        f"of our field -> your field, {fix}") from None
    if not isinstance(columns, dict) or not columns:
        raise UserError(f"--columns={text} must be a non-empty JSON object of our field -> your field, {fix}")
    unknown = [k for k in columns if k not in COLUMN_FIELDS]
    if unknown:
        raise UserError(f"--columns names {unknown[0]!r}, which is not one of our fields; map "
                        f"{', '.join(COLUMN_FIELDS)} to your field names, {fix}")
    bad = [k for k, v in columns.items() if not isinstance(v, str) or not v]
    if bad:
        raise UserError(f"--columns maps {bad[0]!r} to {columns[bad[0]]!r}; the value must be the name of a field "
                        f"of your records (a non-empty string), {fix}")
    lists = [k for k in ("messages", "conversations") if k in columns]
    if lists and len(columns) > 1:
        raise UserError(f"--columns maps {lists[0]!r} together with {[k for k in columns if k != lists[0]][0]!r}; "
                        f"a record is either a conversation or an instruction: map one kind, {fix}")
    return columns


def record_kind(record, columns=None):
    """Which of KINDS a record (a dict) is read as: a column map fixes it, else its fields say."""
    columns = columns or {}
    if "messages" in columns or (not columns and "messages" in record):
        return "chat"
    if "conversations" in columns or (not columns and "conversations" in record):
        return "sharegpt"
    if not columns and ("response" in record or "context" in record) and "output" not in record:
        return "dolly"
    return "alpaca"


def missing_mapped_field(record, columns):
    """(our field, the file's field) of the first field the column map names that `record` lacks, else None."""
    for ours, theirs in columns.items():
        if theirs not in record:
            return ours, theirs
    return None


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


def render(record, template, columns=None):
    """One record -> [(text, carries_loss)]; a piece with carries_loss is followed by <|endoftext|>.

    `columns`: parse_columns' map of our field names to the record's (None: the fields as named above).
    """
    if isinstance(record, InvalidRecord):
        raise record
    if not isinstance(record, dict):
        raise InvalidRecord(f"the record is a {type(record).__name__}, not a JSON object")
    columns = columns or {}
    kind = record_kind(record, columns)
    if kind in ("chat", "sharegpt"):
        form = CHAT if kind == "chat" else SHAREGPT
        field = columns.get(form.field, form.field)
        if field not in record:
            raise InvalidRecord(f"missing field '{field}' (mapped from '{form.field}' by --columns)")
        return _render_chat(record[field], template, field, form)
    if kind == "dolly":
        instruction, input_name, output_name = "instruction", "context", "response"
    else:
        instruction, input_name, output_name = (columns.get(k, k) for k in ("instruction", "input", "output"))
        if not columns and "instruction" not in record and "output" not in record:
            raise InvalidRecord("missing field 'instruction' (Alpaca and Dolly records; chat records have "
                                "'messages', ShareGPT ones 'conversations'; other field names: --columns)")
    # a mapped input must be there (it may be empty or null): a map naming no field is a typo, not "no input"
    input_required = "input" in columns
    if input_required and input_name not in record:
        raise InvalidRecord(f"missing field '{input_name}' (mapped from 'input' by --columns)")
    instruction = _string_field(record, instruction)
    input_text = _string_field(record, input_name, required=False, allow_empty=True)
    output = _string_field(record, output_name)
    return [(instruction_prompt(template, instruction, input_text), False), (output, True)]


def _render_chat(messages, template, field, form):
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord(f"field '{field}' must be a non-empty list")
    roles = {form.system: "system", form.user: "user", form.assistant: "assistant"}
    names = {v: k for k, v in roles.items()}  # our role -> the file's name for it, for the errors
    system, pieces, expect = None, [], "user"
    for i, message in enumerate(messages):
        where = f"{field}[{i}]."
        if not isinstance(message, dict):
            raise InvalidRecord(f"{field}[{i}] is a {type(message).__name__}, not an object")
        name = _string_field(message, form.role, where)
        role = roles.get(name)
        content = _string_field(message, form.content, where, allow_empty=(role == "system"))
        if role == "system" and i == 0:
            system = content
        elif role is None:
            raise InvalidRecord(f"field '{where}{form.role}' is {name!r}, not {form.system}, {form.user} or "
                                f"{form.assistant}")
        elif role != expect:
            raise InvalidRecord(f"{field}[{i}] is a {name} message where a {names[expect]} message belongs "
                                f"(an optional {form.system} message first, then {form.user} and {form.assistant} "
                                f"alternating)")
        elif role == "user":
            pieces.append((template.prompt(content, system=system, first=not pieces), False))
            expect = "assistant"
        else:
            pieces.append((content, True))
            expect = "user"
    if expect != "user":
        raise InvalidRecord(f"the last message must be the {form.assistant}'s (a response to learn)")
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
