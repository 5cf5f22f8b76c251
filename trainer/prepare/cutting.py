"""Cutting a long text into pieces whose GPT-2 ids are exactly those of the whole text, and finding
character offsets in a UTF-8 stream without decoding it whole (nanoGPT's character split)."""
import numpy as np

from trainer.prepare.utf8 import BOM

CHUNK_BYTES = 4 << 20  # text per piece of work; the memory bound scales with it (docs/data.md)

def _is_space_at(buf: bytes, i: int, backwards: bool) -> bool | None:
    """Is the character ending (backwards) or starting at byte i whitespace? None: not decodable here."""
    if not 0 <= i < len(buf):
        return None
    if buf[i] < 0x80:
        return chr(buf[i]).isspace()
    if backwards:  # step back over UTF-8 continuation bytes to the lead byte
        j = i
        while j > 0 and i - j < 3 and buf[j] & 0xC0 == 0x80:
            j -= 1
        try:
            return buf[j:i + 1].decode("utf-8").isspace()
        except UnicodeDecodeError:
            return None
    for n in (2, 3, 4):
        try:
            return buf[i:i + n].decode("utf-8").isspace()
        except UnicodeDecodeError:
            continue
    return None


def safe_cut(buf: bytes) -> int:
    """A byte position where GPT-2's pre-tokenizer cuts anyway (0: none found), as late as possible.

    After a newline with a non-space character on both sides, or before a space with a non-space
    character on both sides: the regex pieces up to there end there, whatever follows, and no
    piece starts differently after it, so encoding the two parts gives the whole text's ids.
    (Python's isspace() covers every character the regex's \\s does.)
    """
    for sep, after in ((b"\n", 1), (b" ", 0)):
        end = len(buf)
        for _ in range(10_000):
            i = buf.rfind(sep, 1, end)
            if i <= 0:
                break
            end = i
            if _is_space_at(buf, i - 1, True) is False and _is_space_at(buf, i + 1, False) is False:
                return i + after
    return 0


def text_pieces(stream, chunk_bytes: int):
    """(offset, bytes) pieces of a binary stream, each cut at a safe_cut point (a BOM is skipped)."""
    buf = stream.read(len(BOM))
    offset = 0
    if buf == BOM:
        buf, offset = b"", len(BOM)
    while True:
        block = stream.read(chunk_bytes)
        if block:
            buf += block
        if len(buf) >= chunk_bytes or not block:
            cut = safe_cut(buf) if block else len(buf)
            if cut:
                yield offset, buf[:cut]
                offset, buf = offset + cut, buf[cut:]
        if not block:
            return


def count_chars(stream) -> int:
    """Characters of a UTF-8 stream (BOM excluded): the bytes that start a character."""
    n, first = 0, True
    while block := stream.read(CHUNK_BYTES):
        if first and block.startswith(BOM):
            n -= 1
        first = False
        n += int(np.count_nonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80))
    return n


def char_offset(stream, index: int) -> int:
    """The byte offset of character number `index` (BOM excluded) of a UTF-8 stream."""
    pos, first = 0, True
    while block := stream.read(CHUNK_BYTES):
        starts = np.flatnonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80)
        if first and block.startswith(BOM):
            starts, index = starts[1:], index
        first = False
        if index < len(starts):
            return pos + int(starts[index])
        index -= len(starts)
        pos += len(block)
    return pos
