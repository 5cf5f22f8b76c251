"""Text must be UTF-8: decoding that names the file and the byte offset of the first byte that is not.

Every reader of text (corpus files, instruction records, rows files checked record by record, eval.py's
--text, sample.py's FILE: prompts) decodes through here, so the same mistake is the same line everywhere.
"""
from pathlib import Path

from trainer.errors import UserError

BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes, path, offset: int = 0) -> str:
    """`data` (found at byte `offset` of `path`) as text; a byte that is not UTF-8 is one line naming its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 (invalid byte at offset {offset + e.start}); convert it with iconv -t UTF-8"
        ) from None


def read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is an error naming the offset."""
    # Windows editors prepend a byte-order mark; it is not part of the text.
    return decode_utf8(Path(path).read_bytes(), path).removeprefix("\ufeff")
