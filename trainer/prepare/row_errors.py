"""Where a rows file is malformed: its file and line (JSON lines) or row (CSV), or the byte offset of text
that is not UTF-8.

`datasets` reads rows files fast and says what is wrong with one, but not where ("Trailing data at position
19"). When it fails on a file, the file is read again here, record by record, to name the first bad one; a row
error found later (a field that is not text) is named by its line in a JSON lines file too.
"""
import csv
import gzip
import io
import json
from pathlib import Path

from trainer.prepare.utf8 import decode_utf8

FIX = "fix or remove that record"


def open_rows(path):
    path = Path(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def is_json_lines(path):
    """A .json/.jsonl file holding one record per line (not one JSON list)."""
    with open_rows(path) as f:
        head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


def utf8_lines(path, f):
    """(line number, text) of a binary file; text that is not UTF-8 raises naming its byte offset."""
    offset = 0
    for n, raw in enumerate(f, start=1):
        text = decode_utf8(raw, path, offset)
        if n == 1:
            text = text.removeprefix("\ufeff")
        offset += len(raw)
        yield n, text


def first_problem(path, fmt, field):
    """'<path> line N: <what is wrong>; <fix>' for the first malformed record of a rows file, or None when this
    reading finds none (the library's own words then stand). Text that is not UTF-8 raises, naming its offset."""
    with open_rows(path) as f:
        lines = utf8_lines(path, f)
        if fmt == "json":
            return json_problem(path, lines, field)
        if fmt == "csv":
            return csv_problem(path, lines)
    return None


def kind(value):
    return {str: "text", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def json_problem(path, lines, field):
    if not is_json_lines(path):
        text = "".join(line for _, line in lines)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); {FIX}"
        return None
    row, kinds = 0, {}
    for n, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path} line {n} (row {row}): not valid JSON ({e.msg}, column {e.colno}); {FIX}"
        if not isinstance(record, dict):
            return f"{path} line {n} (row {row}): a JSON {type(record).__name__}, not an object; {FIX}"
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            return (f"{path} line {n} (row {row}): field '{field}' is a {type(value).__name__}, not text; fix the row "
                    f"or pass --text_field=FIELD")
        for key, value in record.items():  # a column must keep one type (nulls aside) for the reader
            if value is not None and kinds.setdefault(key, kind(value)) != kind(value):
                return (f"{path} line {n} (row {row}): field '{key}' is {kind(value)} where the records before it "
                        f"have {kinds[key]}; {FIX}")
        row += 1
    return None


def csv_problem(path, lines):
    """Rows are counted from 0 after the header (line 1), as `datasets` counts them."""
    texts = [text for _, text in lines]  # every line decoded first: an offset names text that is not UTF-8
    reader = csv.reader(io.StringIO("".join(texts), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return None
        for row, fields in enumerate(reader):
            if fields and len(fields) != len(header):
                return (f"{path} row {row} (line {reader.line_num}): {len(fields)} fields where the header has "
                        f"{len(header)}; {FIX}")
    except csv.Error as e:
        return f"{path} line {reader.line_num}: {e}; {FIX}"
    return None


def line_of_row(path, row):
    """The line of row `row` (from 0) of a JSON lines file: blank lines hold no row."""
    with open_rows(path) as f:
        seen = -1
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return n
    return None
