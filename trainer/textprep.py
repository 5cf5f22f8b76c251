"""What the data/*/prepare.py scripts share: find the documents, split, encode in parallel, write.

Output contract (read by trainer/data.py through np.memmap):
  <data_dir>/<name>/train.bin, val.bin   token ids, dtype as in meta.pkl
  <data_dir>/<name>/meta.pkl             {'tokenizer', 'vocab_size', 'dtype'}
                                         plus 'stoi'/'itos' for characters
Every user-facing failure is a PrepareError whose message fits on one line;
`run_cli` prints it as "error: ..." and exits 1, without a traceback.

Streaming (docs/data.md): the corpus is never held whole. The main process reads the
documents in pieces of at most `chunk_bytes` of text (a long document is cut only where
GPT-2's pre-tokenizer would cut it anyway, so its ids are exactly those of the whole
text), hands them to `num_proc` worker processes, keeps at most 2 x num_proc pieces in
flight, and appends the ids in order to temporary files that replace train.bin/val.bin
only when everything is written.
"""
import argparse
import collections
import glob
import gzip
import io
import itertools
import multiprocessing
import os
import pickle
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.cli import USER_ERROR_EXIT
from trainer.errors import UserError
from trainer.tokenizer import CharTokenizer, Gpt2Tokenizer, gpt2_encoding

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Tiny Shakespeare (public domain) ships with the repo: nothing to download.
TINY_SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
TOKENIZERS = ("gpt2", "char")
_BINARY_SNIFF_BYTES = 8192
CHUNK_BYTES = 4 << 20  # text per piece of work; the memory bound scales with it (docs/data.md)
BOM = b"\xef\xbb\xbf"
# Read through Hugging Face `datasets`, one row per document (the --text_field column).
ROW_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class PrepareError(UserError):
    """A problem with the user's input or arguments, reported in one line (exit code 2, as every entry point)."""


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
    """Run main(), turning a PrepareError into one line on stderr and the entry points' user-error exit code."""
    try:
        main()
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


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


def row_format(path: Path) -> str | None:
    """The `datasets` builder for a rows file (data.jsonl, data.json.gz, ...), else None (text)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return ROW_FORMATS.get(suffixes[-1]) if suffixes else None


def _files_in_folder(folder: Path) -> list[Path]:
    found = (p for p in folder.rglob("*") if p.is_file() and not _is_hidden(p, folder))
    return sorted(found)


def _text_files_only(paths: list[Path]) -> list[Path]:
    # Rows files and .gz are binary by design; every other file must look like text.
    binary = [p for p in paths if not row_format(p) and p.suffix != ".gz" and _looks_binary(p)]
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


def decode_utf8(data: bytes, path, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(
            f"{path} is not UTF-8 (invalid byte at offset {offset + e.start}); convert it with iconv -t UTF-8"
        ) from None


def read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is an error naming the offset."""
    # Windows editors prepend a byte-order mark; it is not part of the text.
    return decode_utf8(path.read_bytes(), path).removeprefix("\ufeff")


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
    atomic_write(dest, lambda f: f.write(data))


def shakespeare_input(input_arg: str | None, dataset_dir: Path) -> str:
    """--input if given, else dataset_dir/input.txt if present, else the repo's copy (downloaded only if deleted)."""
    if input_arg:
        return input_arg
    local = dataset_dir / "input.txt"
    if local.exists():
        return str(local)
    if TINY_SHAKESPEARE.is_file():
        return str(TINY_SHAKESPEARE)
    download_tiny_shakespeare(local)
    return str(local)


# ---------------------------------------------------------------- sources of documents

@dataclass
class TextSource:
    """A text file (or .gz of one): one document, read in pieces. `data`: the text itself (one row)."""
    path: Path
    n_docs: int = 1
    data: bytes | None = None

    def open(self):
        if self.data is not None:
            return io.BytesIO(self.data)
        return gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")

    def size(self) -> int:
        """Bytes of text, 0 where unknown (.gz)."""
        if self.data is not None:
            return len(self.data)
        return 0 if self.path.suffix == ".gz" else self.path.stat().st_size


@dataclass
class RowSource:
    """A `datasets.Dataset` with one column, the text: one document per row."""
    name: str  # what messages call it: the file, folder or hub name
    dataset: object
    field: str

    @property
    def n_docs(self):
        return len(self.dataset)


def _quiet_datasets():
    import datasets
    # Their progress bars and logs would break the one-line error (and clutter the output).
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _reason(e: BaseException) -> str:
    """The innermost cause of a library error, on one line."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return " ".join(str(e).split())[:300] or type(e).__name__


def _row_source(name: str, dataset, field: str) -> RowSource:
    if field not in dataset.column_names:
        raise PrepareError(f"{name} row 0 has no field '{field}' (its fields: {', '.join(dataset.column_names)}); "
                           f"pass --text_field=FIELD")
    return RowSource(name, dataset.select_columns([field]), field)


def _pick_split(name, loaded, split):
    if hasattr(loaded, "column_names") and isinstance(loaded.column_names, list):
        return loaded  # a Dataset
    if split not in loaded:  # a DatasetDict
        raise PrepareError(f"{name} has no split '{split}' (its splits: {', '.join(loaded)}); pass --split=SPLIT")
    return loaded[split]


def _load_rows_file(path: Path, field: str) -> RowSource:
    datasets = _quiet_datasets()
    try:
        dataset = datasets.load_dataset(row_format(path), data_files=str(path), split="train")
    except Exception as e:  # the reader's own words, on one line
        raise PrepareError(f"{path} could not be read as {row_format(path)} ({_reason(e)}); fix the file") from None
    return _row_source(str(path), dataset, field)


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def collect_sources(spec: str, text_field: str = "text", split: str = "train") -> list:
    """The documents named by --input, as sources in order: text files, rows files, a saved dataset or a hub one."""
    if spec.startswith("hf:"):  # a hub dataset: downloaded (or taken from the cache) by datasets
        datasets = _quiet_datasets()
        name = spec[3:]
        try:
            loaded = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise PrepareError(f"could not load hub dataset {name} ({_reason(e)}); check the name and --split, "
                               f"or download it and pass its folder") from None
        return [_row_source(name, loaded, text_field)]
    if Path(spec).is_dir() and is_saved_dataset(Path(spec)):
        datasets = _quiet_datasets()
        loaded = _pick_split(spec, datasets.load_from_disk(spec), split)
        return [_row_source(spec, loaded, text_field)]
    sources = []
    for path in collect_files(spec):
        if row_format(path):
            sources.append(_load_rows_file(path, text_field))
        elif path.stat().st_size:  # empty files are no documents
            sources.append(TextSource(path))
    if not sources:
        raise PrepareError(f"no text in {spec}")
    return sources


# ---------------------------------------------------------------- cutting long texts

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


def _pieces(stream, chunk_bytes: int):
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


def _count_chars(stream) -> int:
    """Characters of a UTF-8 stream (BOM excluded): the bytes that start a character."""
    n, first = 0, True
    while block := stream.read(CHUNK_BYTES):
        if first and block.startswith(BOM):
            n -= 1
        first = False
        n += int(np.count_nonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80))
    return n


def _char_offset(stream, index: int) -> int:
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


# ---------------------------------------------------------------- workers

_STATE = {}


def _init_worker(tokenizer: str, chars, row_sources):
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


def _separator(prev_text_ends_with_newline: bool) -> list[int]:
    """Between two documents of a split: <|endoftext|>, or for characters a newline if none ends the first."""
    if _STATE["tokenizer"] == "gpt2":
        return [Gpt2Tokenizer.eot_token]
    return [] if prev_text_ends_with_newline else [_STATE["newline"]]


def row_texts(source: "RowSource", start: int, stop: int):
    """(row number, text) of rows start..stop-1; a row whose field is not text is an error."""
    values = source.dataset[start:stop][source.field]
    for row, value in enumerate(values, start=start):
        if not isinstance(value, str):
            what = "missing or null" if value is None else f"a {type(value).__name__}, not text"
            raise PrepareError(f"{source.name} row {row}: field '{source.field}' is {what}; "
                               f"fix the row or pass --text_field=FIELD")
        yield row, value


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
            parts[split].append(np.array(_separator(last_nl[split]), dtype=np.uint32))
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


# Imported, these run native thread pools that a forked child would inherit half-held (locks, queues).
_THREADED_MODULES = ("pyarrow", "torch")


def start_method() -> str:
    """'fork' when it is safe, else 'spawn'.

    fork starts a worker in milliseconds with the tokenizer already loaded; spawn re-imports and
    reloads the BPE in each (about 0.5 s of CPU each, 15% of a 50 MB run's time). Forking is safe
    only from a process with one thread: not after `datasets`/pyarrow or torch were imported (row
    inputs, or prepare called from a process that trains), nor on platforms without fork.
    """
    if ("fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
            and not any(name in sys.modules for name in _THREADED_MODULES)):
        return "fork"
    return "spawn"


def run_tasks(tasks, num_proc: int, initargs, init=None, func=None):
    """Yield (meta, result) of each (meta, pieces) task in order, at most 2 x num_proc in flight.

    Workers start only when there is more than one task: a small input is encoded in-process.
    """
    init, func = init or _init_worker, func or encode_task  # (instructions.py brings its own)
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, 2))
    if num_proc <= 1 or len(head) < 2:
        init(*initargs)
        for meta, pieces in itertools.chain(head, tasks):
            yield meta, func(pieces)
        return
    with multiprocessing.get_context(start_method()).Pool(num_proc, init, initargs) as pool:
        in_flight = collections.deque()
        for meta, pieces in itertools.chain(head, tasks):
            in_flight.append((meta, pool.apply_async(func, (pieces,))))
            if len(in_flight) >= 2 * num_proc:
                meta, result = in_flight.popleft()
                yield meta, result.get()
        while in_flight:
            meta, result = in_flight.popleft()
            yield meta, result.get()


# ---------------------------------------------------------------- the split

def check_val_fraction(val_fraction: float) -> None:
    # Both splits must exist: the trainer evaluates on val.bin.
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def val_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of the validation documents: round(n x val_fraction) of them (1 to n - 1), drawn by seed."""
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return np.sort(np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False))


TRAIN, VAL = 0, 1


def _tasks(sources, val_docs, chunk_bytes, single_cut):
    """(meta, pieces) tasks of about chunk_bytes of text; meta = documents finished by the task.

    val_docs: sorted validation document indices (many documents); single_cut: for one document,
    the byte offset where its validation part starts (nanoGPT's character split).
    """
    pieces, size, done = [], 0, 0.0
    doc = 0
    for index, source in enumerate(sources):
        if isinstance(source, RowSource):
            n = source.n_docs
            splits = np.zeros(n, dtype=np.uint8)
            lo, hi = np.searchsorted(val_docs, [doc, doc + n])
            splits[val_docs[lo:hi] - doc] = VAL
            # rows per piece from the average row size, so a piece holds about chunk_bytes of text
            nbytes = max(1, source.dataset.data.nbytes)
            step = max(1, min(n, int(chunk_bytes * n / nbytes)))
            for start in range(0, n, step):
                stop = min(n, start + step)
                pieces.append(("rows", index, start, stop, splits[start:stop].copy()))
                size += (stop - start) * nbytes / n
                done += stop - start
                if size >= chunk_bytes:
                    yield done, pieces
                    pieces, size, done = [], 0, 0.0
            doc += n
            continue
        split = VAL if (val_docs.size and np.searchsorted(val_docs, doc) < val_docs.size
                        and val_docs[np.searchsorted(val_docs, doc)] == doc) else TRAIN
        total = source.size()
        with source.open() as stream:
            starts_doc = True
            for offset, data in _pieces(stream, chunk_bytes):
                parts = [(offset, data)]
                if single_cut is not None and offset < single_cut < offset + len(data):
                    at = single_cut - offset
                    parts = [(offset, data[:at]), (single_cut, data[at:])]
                for off, part in parts:
                    if single_cut is not None:
                        split = VAL if off >= single_cut else TRAIN
                        starts_doc = off == single_cut or starts_doc
                    pieces.append(("text", split, starts_doc, part, str(source.path), off))
                    starts_doc = False
                    size += len(part)
                    done += len(part) / total if total else 0
                if size >= chunk_bytes:
                    yield done, pieces
                    pieces, size, done = [], 0, 0.0
        if not total:
            done += 1
        doc += 1
    if pieces:
        yield done, pieces


# ---------------------------------------------------------------- write

def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def make_meta(tok) -> dict:
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size)}
    if tok.name == "char":
        # Same keys as nanoGPT's shakespeare_char meta.pkl, so its tools read ours.
        meta.update(stoi=tok.stoi, itos=tok.itos)
    return meta


def tmp_name(path: Path) -> Path:
    # The pid lets a later run tell a killed run's leftovers from a running one's.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: Path, write) -> None:
    # A temp file in the same folder, then os.replace: readers see the old file
    # or the whole new one, never a partial write.
    # (Not tempfile.mkstemp: its files are private, 0600, whatever the umask.)
    tmp = tmp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_tmp(folder: Path) -> None:
    """Temp files of a killed prepare (its pid no longer runs) in folder: removed."""
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        if len(parts) >= 4 and parts[-3].isdigit():
            try:
                os.kill(int(parts[-3]), 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


class SplitWriter:
    """train.bin and val.bin, appended to in temp files; commit() renames them into place, abort() deletes them.

    Until commit, the dataset already in out_dir (if any) is untouched; folders made for the
    temp files are removed again on abort.
    """

    def __init__(self, out_dir: Path, dtype: str):
        self.out_dir, self.dtype = out_dir, dtype
        self.made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out_dir)
        self.paths = {s: out_dir / f"{name}.bin" for s, name in ((TRAIN, "train"), (VAL, "val"))}
        self.tmps = {s: tmp_name(p) for s, p in self.paths.items()}
        self.files = {s: open(t, "xb") for s, t in self.tmps.items()}
        self.count = {TRAIN: 0, VAL: 0}
        self.last_nl = {}

    def write(self, split: int, ids) -> None:
        arr = np.asarray(ids).astype(self.dtype, copy=False)
        try:
            self.files[split].write(memoryview(arr))
        except OSError as e:
            raise PrepareError(f"could not write {self.tmps[split]} ({e.strerror}); free some disk space or "
                               f"pass --data_dir on a disk with room (the previous dataset is kept)") from None
        self.count[split] += len(arr)

    def commit(self, meta: dict) -> None:
        try:
            for f in self.files.values():
                f.close()
        except OSError as e:
            raise PrepareError(f"could not write {self.out_dir} ({e.strerror}); free some disk space") from None
        for split, tmp in self.tmps.items():
            os.replace(tmp, self.paths[split])
            name = self.paths[split].stem
            for extra in ("mask", "pos"):  # left by an instruction dataset of the same name: not this text's
                (self.out_dir / f"{name}_{extra}.bin").unlink(missing_ok=True)
        atomic_write(self.out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))  # last: never describes old bins

    def abort(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)
        for folder in self.made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


# ---------------------------------------------------------------- progress

class Progress:
    """Documents done, tokens/s and ETA: a tqdm bar on a terminal, else a line on stdout every 30 s."""

    def __init__(self, n_docs: int):
        self.n_docs, self.start, self.tokens, self.docs, self.last = n_docs, time.time(), 0, 0.0, time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            tqdm.monitor_interval = 0  # no monitor thread: workers may still be forked (start_method)
            self.bar = tqdm(total=n_docs, unit="doc", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:,.0f}/{total_fmt} docs [{elapsed}<{remaining}{postfix}]")

    def update(self, docs: float, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.time() - self.start)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        elif time.time() - self.last >= 30:
            self.last = time.time()
            left = (self.n_docs - self.docs) * (time.time() - self.start) / max(self.docs, 1e-9)
            print(f"progress: {self.docs:,.0f}/{self.n_docs:,} documents, {self.tokens:,} tokens, "
                  f"{rate:,.0f} tokens/s, ETA {left / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the whole pipeline

def _char_vocab(sources, n_docs: int) -> CharTokenizer:
    """Every character of the corpus (one pass, streamed); a newline too when documents are joined."""
    chars = set()
    for source in sources:
        if isinstance(source, RowSource):
            for start in range(0, source.n_docs, 10_000):
                for _, text in row_texts(source, start, min(source.n_docs, start + 10_000)):
                    chars.update(text)
            continue
        with source.open() as stream:
            for offset, data in _pieces(stream, CHUNK_BYTES):
                chars.update(decode_utf8(data, source.path, offset))
    if n_docs > 1:
        chars.add("\n")
    return CharTokenizer.from_text("".join(sorted(chars)))


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare_corpus(spec: str, out_dir: Path, tokenizer: str = "gpt2", val_fraction: float = 0.1, seed: int = 1337,
                   text_field: str = "text", num_proc: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                   split: str = "train") -> dict:
    """Read, split, encode and write a corpus of any size; prints what it did and returns meta.

    One document: nanoGPT's split (the first 1 - val_fraction of its characters train).
    Many: whole documents, round(n x val_fraction) of them (at least one) drawn by `seed` for val;
    each split holds its documents in input order, <|endoftext|> between them.
    """
    check_val_fraction(val_fraction)
    if tokenizer not in TOKENIZERS:
        raise PrepareError(f"unknown --tokenizer={tokenizer} (choose {' or '.join(TOKENIZERS)})")
    num_proc = num_proc or default_num_proc()
    sources = collect_sources(spec, text_field, split)
    n_docs = sum(s.n_docs for s in sources)
    if n_docs == 0:
        raise PrepareError(f"no text in {spec}")
    single_cut, val_docs = None, np.zeros(0, dtype=np.int64)
    if n_docs == 1:
        if isinstance(sources[0], RowSource):  # one row: split as one text
            (_, text), = row_texts(sources[0], 0, 1)
            sources = [TextSource(Path(f"{sources[0].name} row 0"), data=text.encode("utf-8"))]
        with sources[0].open() as stream:
            n_chars = _count_chars(stream)
        print(f"length of dataset in characters: {n_chars:,}")
        with sources[0].open() as stream:
            single_cut = _char_offset(stream, int(n_chars * (1 - val_fraction)))
    else:
        val_docs = val_documents(n_docs, val_fraction, seed)
        print(f"{n_docs:,} documents: {len(val_docs):,} for validation (--val_fraction={val_fraction}, --seed={seed})")
    tok = Gpt2Tokenizer() if tokenizer == "gpt2" else _char_vocab(sources, n_docs)
    chars = None if tokenizer == "gpt2" else "".join(tok.itos[i] for i in range(tok.vocab_size))
    rows = [s if isinstance(s, RowSource) else None for s in sources]
    meta = make_meta(tok)
    _check_some_text(sources)
    writer = SplitWriter(out_dir, meta["dtype"])
    progress = Progress(n_docs)
    try:
        for docs_done, result in run_tasks(_tasks(sources, val_docs, chunk_bytes, single_cut), num_proc,
                                            (tokenizer, chars, rows)):
            tokens = 0
            for split, (starts_doc, ids, ends_nl, _) in sorted(result.items()):
                if starts_doc and writer.count[split]:
                    writer.write(split, _sep(tok, writer.last_nl[split]))
                writer.write(split, ids)
                writer.last_nl[split] = ends_nl
                tokens += len(ids)
            progress.update(docs_done, tokens)
        progress.close()
        if not writer.count[TRAIN] or not writer.count[VAL]:
            raise PrepareError("input too small: the train or val split has no tokens; add text or "
                               "raise --val_fraction")
        print(f"vocab size: {tok.vocab_size:,}")
        print(f"train has {writer.count[TRAIN]:,} tokens")
        print(f"val has {writer.count[VAL]:,} tokens")
        writer.commit(meta)
    except BaseException:
        progress.close()
        writer.abort()
        raise
    print(f"wrote {out_dir}/train.bin, val.bin, meta.pkl ({meta['dtype']})")
    return meta


def _sep(tok, prev_ends_with_newline: bool) -> list[int]:
    if tok.name == "gpt2":
        return [tok.eot_token]
    return [] if prev_ends_with_newline else [tok.stoi["\n"]]


def _check_some_text(sources) -> None:
    """Text files of whitespace only are no corpus: an error before anything is written."""
    if any(isinstance(s, RowSource) for s in sources):
        return
    for source in sources:
        with source.open() as stream:
            while block := stream.read(1 << 16):
                if block.replace(BOM, b"").strip():
                    return
    raise PrepareError(f"no text in {', '.join(str(s.path) for s in sources[:3])}")


# ---------------------------------------------------------------- scripts

def shakespeare_main(description: str, name: str, tokenizer: str, default_data_dir: Path) -> None:
    """The body of data/shakespeare*/prepare.py, which differ only in name and tokenizer."""
    parser = make_parser(description)
    parser.add_argument("--input", help="tiny Shakespeare text (default: <data_dir>/<name>/input.txt if present, "
                                        "else the repo's data/tinyshakespeare.txt)")
    parser.add_argument("--data_dir", default=str(default_data_dir), help="datasets folder (default: the repo's data/)")
    parser.add_argument("--num_proc", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args()
    out_dir = Path(args.data_dir) / name
    prepare_corpus(shakespeare_input(args.input, out_dir), out_dir, tokenizer, num_proc=args.num_proc)
