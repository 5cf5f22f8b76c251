"""What the data/*/prepare.py scripts share: read text, split, encode, write.

Output contract (read by trainer/data.py through np.memmap):
  <data_dir>/<name>/train.bin, val.bin   token ids, dtype as in meta.pkl
  <data_dir>/<name>/meta.pkl             {'tokenizer', 'vocab_size', 'dtype'}
                                         plus 'stoi'/'itos' for characters
Every user-facing failure is a PrepareError whose message fits on one line;
`run_cli` prints it as "error: ..." and exits 1, without a traceback.
"""
import argparse
import glob
import os
import pickle
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from trainer.tokenizer import CharTokenizer, Gpt2Tokenizer

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TOKENIZERS = ("gpt2", "char")
_BINARY_SNIFF_BYTES = 8192


class PrepareError(Exception):
    """A problem with the user's input or arguments, reported in one line."""


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    # argparse's own errors print the usage and then "prog: error: ..."; ours
    # must be the single "error: ..." line every prepare script promises.
    def error(self, message):
        raise PrepareError(message)


def make_parser(description: str) -> argparse.ArgumentParser:
    # argparse already accepts nanoGPT's --key=value spelling.
    return _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_cli(main) -> None:
    """Run main(), turning a PrepareError into one line on stderr and exit 1."""
    try:
        main()
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------- input files

def _has_glob_magic(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _is_hidden(path: Path, root: Path) -> bool:
    # .git, .DS_Store, editor swap files: never what the user means by "my texts".
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _looks_binary(path: Path) -> bool:
    # Text (UTF-8) never contains NUL; images, archives and UTF-16 files do.
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF_BYTES)


def _files_in_folder(folder: Path) -> list[Path]:
    found = (p for p in folder.rglob("*") if p.is_file() and not _is_hidden(p, folder))
    return sorted(found)


def _text_files_only(paths: list[Path]) -> list[Path]:
    binary = [p for p in paths if _looks_binary(p)]
    if binary:
        names = ", ".join(str(p) for p in binary[:3]) + (", ..." if len(binary) > 3 else "")
        print(f"skipping {len(binary)} binary file(s): {names}")
    skipped = set(binary)
    return [p for p in paths if p not in skipped]


def collect_files(spec: str) -> list[Path]:
    """The files named by --input: one file, a folder (recursive) or a glob.

    A file named explicitly is always read; files found in a folder or by a
    glob are read in sorted order, skipping hidden and binary files.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _text_files_only(_files_in_folder(path))
    if _has_glob_magic(spec):
        matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
        files = sorted({f for m in matches for f in ([m] if m.is_file() else _files_in_folder(m))})
        if not files:
            raise PrepareError(f"no files match {spec}")
        return _text_files_only(files)
    raise PrepareError(f"input not found: {spec}")


def read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is an error naming the offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(
            f"{path} is not UTF-8 (invalid byte at offset {e.start}); convert it with iconv -t UTF-8"
        ) from None
    # Windows editors prepend a byte-order mark; it is not part of the text.
    return text.removeprefix("\ufeff")


def read_documents(spec: str) -> list[str]:
    """One string per non-empty input file; an input with no text is an error."""
    docs = [read_utf8(p) for p in collect_files(spec)]
    docs = [d for d in docs if d]
    if not any(d.strip() for d in docs):
        raise PrepareError(f"no text in {spec}")
    return docs


# ---------------------------------------------------------------- tiny Shakespeare

def download_tiny_shakespeare(dest: Path, url: str = TINY_SHAKESPEARE_URL, timeout: float = 15) -> None:
    """Fetch tiny Shakespeare into dest (atomically, so no half file stays)."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise PrepareError(
            f"could not download tiny Shakespeare ({reason}); pass --input=path/to/input.txt"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(dest, lambda f: f.write(data))


def shakespeare_input(input_arg: str | None, dataset_dir: Path) -> str:
    """--input if given, else dataset_dir/input.txt, downloaded when missing."""
    if input_arg:
        return input_arg
    local = dataset_dir / "input.txt"
    if not local.exists():
        download_tiny_shakespeare(local)
    return str(local)


# ---------------------------------------------------------------- split and encode

def check_val_fraction(val_fraction: float) -> None:
    # Both splits must exist: the trainer evaluates on val.bin.
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """nanoGPT's split: the first (1 - val_fraction) of the characters train.

    The cut is a character position in the concatenated documents; the
    document it falls in is cut in two, one piece on each side.
    """
    check_val_fraction(val_fraction)
    cut = int(sum(len(d) for d in docs) * (1 - val_fraction))
    train, val = [], []
    for doc in docs:
        if cut >= len(doc):
            train.append(doc)
        elif cut <= 0:
            val.append(doc)
        else:
            train.append(doc[:cut])
            val.append(doc[cut:])
        cut -= len(doc)
    return train, val


def _join_for_chars(docs: list[str]) -> str:
    # Characters have no end-of-text token, so keep files on separate lines.
    return "".join(d if d.endswith("\n") or i == len(docs) - 1 else d + "\n" for i, d in enumerate(docs))


def _gpt2_ids(tok: Gpt2Tokenizer, docs: list[str]) -> list[int]:
    # <|endoftext|> between files, GPT-2's document boundary; none at the ends,
    # so a single file gives exactly nanoGPT's token counts.
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            ids.append(tok.eot_token)
        ids.extend(tok.encode_ordinary(doc))
    return ids


def encode_splits(train_docs: list[str], val_docs: list[str], tokenizer: str):
    """(tokenizer object, train ids, val ids) for 'gpt2' or 'char'."""
    if tokenizer == "gpt2":
        tok = Gpt2Tokenizer()
        return tok, _gpt2_ids(tok, train_docs), _gpt2_ids(tok, val_docs)
    if tokenizer == "char":
        train_text, val_text = _join_for_chars(train_docs), _join_for_chars(val_docs)
        tok = CharTokenizer.from_text(train_text + val_text)
        return tok, tok.encode(train_text), tok.encode(val_text)
    raise PrepareError(f"unknown --tokenizer={tokenizer} (choose {' or '.join(TOKENIZERS)})")


# ---------------------------------------------------------------- write

def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def make_meta(tok) -> dict:
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size)}
    if tok.name == "char":
        # Same keys as nanoGPT's shakespeare_char meta.pkl, so its tools read ours.
        meta.update(stoi=tok.stoi, itos=tok.itos)
    return meta


def _atomic_write(path: Path, write) -> None:
    # A temp file in the same folder, then os.replace: readers see the old file
    # or the whole new one, never a partial write.
    # (Not tempfile.mkstemp: its files are private, 0600, whatever the umask.)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dataset(out_dir: Path, tok, train_ids: list[int], val_ids: list[int]) -> dict:
    """train.bin, val.bin, then meta.pkl (last, so it never describes old bins)."""
    if not train_ids or not val_ids:
        raise PrepareError("input too small: the train or val split has no tokens")
    meta = make_meta(tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        arr = np.asarray(ids, dtype=meta["dtype"])
        _atomic_write(out_dir / f"{split}.bin", arr.tofile)
        for extra in ("mask", "pos"):  # left by an instruction dataset of the same name: not this text's
            (out_dir / f"{split}_{extra}.bin").unlink(missing_ok=True)
    _atomic_write(out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))
    return meta


def prepare(docs: list[str], out_dir: Path, tokenizer: str, val_fraction: float = 0.1) -> dict:
    """The whole pipeline after reading: split, encode, report, write; returns meta."""
    print(f"length of dataset in characters: {sum(len(d) for d in docs):,}")
    train_docs, val_docs = split_documents(docs, val_fraction)
    tok, train_ids, val_ids = encode_splits(train_docs, val_docs, tokenizer)
    print(f"vocab size: {tok.vocab_size:,}")
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    meta = write_dataset(out_dir, tok, train_ids, val_ids)
    print(f"wrote {out_dir}/train.bin, val.bin, meta.pkl ({meta['dtype']})")
    return meta



# ---------------------------------------------------------------- scripts

def shakespeare_main(description: str, name: str, tokenizer: str, default_data_dir: Path) -> None:
    """The body of data/shakespeare*/prepare.py, which differ only in name and tokenizer."""
    parser = make_parser(description)
    parser.add_argument("--input", help="tiny Shakespeare text (default: <data_dir>/<name>/input.txt, downloaded if missing)")
    parser.add_argument("--data_dir", default=str(default_data_dir), help="datasets folder (default: the repo's data/)")
    args = parser.parse_args()
    out_dir = Path(args.data_dir) / name
    docs = read_documents(shakespeare_input(args.input, out_dir))
    prepare(docs, out_dir, tokenizer)
