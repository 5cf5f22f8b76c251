"""Preparing a text corpus of any size: find the documents, split them, encode in parallel, write.

`python data/prepare.py --input=...` (and the shakespeare scripts) come here. The corpus is never held
whole (docs/data.md): the main process reads the documents in pieces of at most `chunk_bytes` of text
(a long document is cut only where GPT-2's pre-tokenizer would cut it anyway, trainer/prepare/cutting.py,
so its ids are exactly those of the whole text), hands them to `num_proc` worker processes
(trainer/prepare/workers.py), and appends the ids in order to temporary files that replace
train.bin/val.bin only when everything is written (trainer/prepare/output.py). Every user-facing
failure is a UserError whose message fits on one line (exit code 2, as every entry point).
"""
from pathlib import Path

import numpy as np

from trainer.data.tokenizer import CharTokenizer, Gpt2Tokenizer
from trainer.errors import UserError
from trainer.prepare.cutting import CHUNK_BYTES, char_offset, count_chars, text_pieces
from trainer.prepare.encode import TRAIN, VAL, encode_task, init_worker, separator
from trainer.prepare.output import DatasetWriter, make_meta
from trainer.prepare.progress import Progress
from trainer.prepare.sources import RowSource, TextSource, collect_sources, row_texts
from trainer.prepare.utf8 import BOM, decode_utf8
from trainer.prepare.split import val_indices
from trainer.prepare.workers import default_num_proc, run_tasks

TOKENIZERS = ("gpt2", "char")  # data/prepare.py's --tokenizer: GPT-2 BPE, or the corpus' characters
SPLIT_FILES = {TRAIN: "train.bin", VAL: "val.bin"}


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
            for offset, data in text_pieces(stream, CHUNK_BYTES):
                chars.update(decode_utf8(data, source.path, offset))
    if n_docs > 1:
        chars.add("\n")
    return CharTokenizer.from_text("".join(sorted(chars)))


def prepare_corpus(spec: str, out_dir: Path, tokenizer: str = "gpt2", val_fraction: float = 0.1, seed: int = 1337,
                   text_field: str = "text", num_proc: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                   split: str = "train") -> dict:
    """Read, split, encode and write a corpus of any size; prints what it did and returns meta.

    One document: nanoGPT's split (the first 1 - val_fraction of its characters train).
    Many: whole documents, round(n x val_fraction) of them (at least one) drawn by `seed` for val;
    each split holds its documents in input order, <|endoftext|> between them.
    tokenizer (one of TOKENIZERS) and val_fraction are data/prepare.py's flags, checked there.
    """
    num_proc = num_proc or default_num_proc()
    sources = collect_sources(spec, text_field, split)
    n_docs = sum(s.n_docs for s in sources)
    if n_docs == 0:
        raise UserError(f"no text in {spec}")
    single_cut, val_docs = None, np.zeros(0, dtype=np.int64)
    if n_docs == 1:
        if isinstance(sources[0], RowSource):  # one row: split as one text
            (_, text), = row_texts(sources[0], 0, 1)
            sources = [TextSource(Path(f"{sources[0].name} row 0"), data=text.encode("utf-8"))]
        with sources[0].open() as stream:
            n_chars = count_chars(stream)
        print(f"length of dataset in characters: {n_chars:,}")
        with sources[0].open() as stream:
            single_cut = char_offset(stream, int(n_chars * (1 - val_fraction)))
    else:
        val_docs = val_indices(n_docs, val_fraction, seed)
        print(f"{n_docs:,} documents: {len(val_docs):,} for validation (--val_fraction={val_fraction}, --seed={seed})")
    tok = Gpt2Tokenizer() if tokenizer == "gpt2" else _char_vocab(sources, n_docs)
    chars = None if tokenizer == "gpt2" else "".join(tok.itos[i] for i in range(tok.vocab_size))
    rows = [s if isinstance(s, RowSource) else None for s in sources]
    meta = make_meta(tok)
    _check_some_text(sources)
    writer = DatasetWriter(out_dir)
    count, ends_with_newline = {TRAIN: 0, VAL: 0}, {}
    newline = tok.stoi.get("\n") if tokenizer == "char" else None
    progress = Progress(n_docs)
    try:
        for name in SPLIT_FILES.values():
            writer.open(name)
        for docs_done, result in run_tasks(corpus_tasks(sources, val_docs, chunk_bytes, single_cut), num_proc,
                                           init_worker, (tokenizer, chars, rows), encode_task):
            tokens = 0
            for split, (starts_doc, ids, ends_nl, _) in sorted(result.items()):
                if starts_doc and count[split]:
                    sep = separator(tokenizer, newline, ends_with_newline[split])
                    count[split] += writer.append(SPLIT_FILES[split], sep, meta["dtype"])
                count[split] += writer.append(SPLIT_FILES[split], ids, meta["dtype"])
                ends_with_newline[split] = ends_nl
                tokens += len(ids)
            progress.update(docs_done, tokens)
        progress.close()
        if not count[TRAIN] or not count[VAL]:
            raise UserError("input too small: the train or val split has no tokens; add text or "
                            "raise --val_fraction")
        print(f"vocab size: {tok.vocab_size:,}")
        print(f"train has {count[TRAIN]:,} tokens")
        print(f"val has {count[VAL]:,} tokens")
        writer.commit(meta)
    except BaseException:
        progress.close()
        writer.abort()
        raise
    print(f"wrote {out_dir}/train.bin, val.bin, meta.pkl ({meta['dtype']})")
    return meta


def _check_some_text(sources) -> None:
    """Text files of whitespace only are no corpus: an error before anything is written."""
    if any(isinstance(s, RowSource) for s in sources):
        return
    for source in sources:
        with source.open() as stream:
            while block := stream.read(1 << 16):
                if block.replace(BOM, b"").strip():
                    return
    raise UserError(f"no text in {', '.join(str(s.path) for s in sources[:3])}")


def corpus_tasks(sources, val_docs, chunk_bytes, single_cut):
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
            for offset, data in text_pieces(stream, chunk_bytes):
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
