"""The documents a corpus is made of: `--input` (a file, a folder, a glob, rows files, a saved or hub
`datasets` dataset) as sources read in order, and decoding their UTF-8 with errors that name the place.

A text file (or .gz of one) is one document, read in pieces; a rows file (.jsonl, .json, .parquet, .csv),
a folder saved by datasets' save_to_disk and hf:NAME give one document per row (the --text_field column).
"""
import glob
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.os_errors import refusal_in
from trainer.prepare.row_errors import first_problem, is_json_lines, line_of_row

_BINARY_SNIFF_BYTES = 8192
# Read through Hugging Face `datasets`, one row per document (the --text_field column).
ROW_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def _raise(error: OSError):
    raise error


def _files_in_folder(folder: Path) -> list[Path]:
    # os.walk, not rglob: a folder this user may not read is an error naming it, not silently no files
    found = (Path(root) / name for root, _, names in os.walk(folder, onerror=_raise) for name in names)
    return sorted(p for p in found if p.is_file() and not _is_hidden(p, folder))


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
            raise UserError(f"no files match {spec}")
        return _text_files_only(files)
    raise UserError(f"input not found: {spec}")


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
        raise UserError(f"{name} row 0 has no field '{field}' (its fields: {', '.join(dataset.column_names)}); "
                           f"pass --text_field=FIELD")
    return RowSource(name, dataset.select_columns([field]), field)


def _pick_split(name, loaded, split):
    if hasattr(loaded, "column_names") and isinstance(loaded.column_names, list):
        return loaded  # a Dataset
    if split not in loaded:  # a DatasetDict
        raise UserError(f"{name} has no split '{split}' (its splits: {', '.join(loaded)}); pass --split=SPLIT")
    return loaded[split]


def _load_rows_file(path: Path, field: str) -> RowSource:
    datasets = _quiet_datasets()
    try:
        dataset = datasets.load_dataset(row_format(path), data_files=str(path), split="train")
    except Exception as e:
        refused = refusal_in(e)
        if refused is not None:  # permission, no space for the Arrow cache: the OS's own line
            raise refused from None
        # where the file is malformed (its line or row), else the reader's own words, on one line
        raise UserError(first_problem(path, row_format(path), field) or
                        f"{path} could not be read as {row_format(path)} ({_reason(e)}); fix the file") from None
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
            raise UserError(f"could not load hub dataset {name} ({_reason(e)}); check the name and --split, "
                               f"or download it and pass its folder") from None
        return [_row_source(name, loaded, text_field)]
    if Path(spec).is_dir():
        os.scandir(spec).close()  # a folder this user may not read: the OS's line, naming it
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
        raise UserError(f"no text in {spec}")
    return sources


def row_place(source: "RowSource", row: int) -> str:
    """'row N', or 'line L (row N)' in a JSON lines file, where a user finds a record with an editor."""
    path = Path(source.name)
    if row_format(path) == "json" and path.is_file() and is_json_lines(path):
        line = line_of_row(path, row)
        if line is not None:
            return f"line {line} (row {row})"
    return f"row {row}"


def row_texts(source: "RowSource", start: int, stop: int):
    """(row number, text) of rows start..stop-1; a row whose field is not text is an error."""
    try:
        values = source.dataset[start:stop][source.field]
    except UnicodeDecodeError:  # a CSV reader may keep bytes that are not UTF-8 until a row is read
        path = Path(source.name)
        raise UserError((path.is_file() and first_problem(path, row_format(path), source.field))
                        or f"{source.name} rows {start} to {stop - 1} are not UTF-8; convert it with iconv -t UTF-8"
                        ) from None
    for row, value in enumerate(values, start=start):
        if not isinstance(value, str):
            what = "missing or null" if value is None else f"a {type(value).__name__}, not text"
            raise UserError(f"{source.name} {row_place(source, row)}: field '{source.field}' is {what}; "
                            f"fix the row or pass --text_field=FIELD")
        yield row, value
