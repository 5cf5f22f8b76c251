"""The corpus workers' job: encode a piece of work (text pieces or rows) into token ids per split.

Each worker process holds the tokenizer and the row datasets (init_worker); encode_task turns one task
into {split: ids}, with <|endoftext|> (or, for characters, a newline) between documents.
"""
import numpy as np

from trainer.data.tokenizer import Gpt2Tokenizer, gpt2_encoding
from trainer.prepare.sources import row_texts
from trainer.prepare.utf8 import decode_utf8

TRAIN, VAL = 0, 1  # the split of a piece of work
_STATE = {}


def init_worker(tokenizer: str, chars, row_sources):
    """In each worker (and in-process for small inputs): the tokenizer and the row datasets."""
    _STATE.clear()
    _STATE.update(tokenizer=tokenizer, rows=row_sources)
    if tokenizer == "gpt2":
        _STATE["enc"] = gpt2_encoding()
    else:
        _STATE["codepoints"] = np.array([ord(c) for c in chars], dtype=np.uint32)
        _STATE["newline"] = chars.index("\n") if "\n" in chars else None


def _encode(text: str) -> np.ndarray:
    if _STATE["tokenizer"] == "gpt2":
        # encode_ordinary's ids (a literal "<|endoftext|>" stays text), straight into an array.
        return _STATE["enc"].encode_to_numpy(text, disallowed_special=())
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    return np.searchsorted(_STATE["codepoints"], points).astype(np.uint32)


def separator(tokenizer: str, newline_id, prev_text_ends_with_newline: bool) -> list[int]:
    """Between two documents of a split: <|endoftext|>, or for characters a newline if none ends the first."""
    if tokenizer == "gpt2":
        return [Gpt2Tokenizer.eot_token]
    return [] if prev_text_ends_with_newline else [newline_id]


def encode_task(pieces):
    """Encode one piece of work -> {split: (starts a document, ids with separators, ends with newline, chars)}.

    A piece is ('text', split, starts_document, bytes, path, offset) or ('rows', source, start, stop, splits).
    """
    parts, first, last_nl, chars = {}, {}, {}, {}

    def add(split, starts_doc, text):
        if not text:
            return
        if split not in first:
            first[split], parts[split], chars[split] = starts_doc, [], 0
        elif starts_doc:
            parts[split].append(np.array(separator(_STATE["tokenizer"], _STATE.get("newline"), last_nl[split]),
                                           dtype=np.uint32))
        parts[split].append(_encode(text))
        last_nl[split] = text.endswith("\n")
        chars[split] += len(text)

    for piece in pieces:
        if piece[0] == "text":
            _, split, starts_doc, data, path, offset = piece
            add(split, starts_doc, decode_utf8(data, path, offset))
        else:
            _, source_index, start, stop, splits = piece
            for row, text in row_texts(_STATE["rows"][source_index], start, stop):
                add(int(splits[row - start]), True, text)
    return {s: (first[s], np.concatenate(parts[s]), last_nl[s], chars[s]) for s in first}
