"""data/prepare.py at scale: every input format token-exact against a reference encoding, the
streamed pieces and worker processes giving the whole text's ids, the whole-document split,
a kill mid-way keeping the previous dataset, and the one-line errors for bad rows and fields."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data.tokenizer import gpt2_encoding  # noqa: E402
from trainer.prepare.corpus import prepare_corpus  # noqa: E402
from trainer.prepare.cutting import safe_cut  # noqa: E402
from trainer.prepare.split import val_indices  # noqa: E402
from trainer.prepare.workers import start_method  # noqa: E402

from conftest import SHAKESPEARE  # noqa: E402

EOT = 50256


def prepare(tmp_path, *args, check=True, name="ds"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = subprocess.run([sys.executable, str(REPO / "data/prepare.py"), f"--name={name}",
                           f"--data_dir={tmp_path / 'data'}", *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def splits(tmp_path, name="ds"):
    folder = tmp_path / "data" / name
    return [np.fromfile(folder / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val")]


def reference(texts, val_fraction=0.1, seed=1337):
    """The expected (train, val) ids: whole documents, encode_ordinary, <|endoftext|> between documents."""
    enc = gpt2_encoding()
    val = set(val_indices(len(texts), val_fraction, seed).tolist())
    out = ([], [])
    for i, text in enumerate(texts):
        ids = out[i in val]
        if ids:
            ids.append(EOT)
        ids.extend(enc.encode_ordinary(text))
    return out


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


TEXTS = ["First document.\nIt has two lines.\n", "Second: café, naïve, 東京 🙂 and a literal <|endoftext|> marker",
         "  leading spaces\n\n\ntrailing\t \n", "4th", "Fifth one, with numbers 12345 and 'quotes' isn't it?\n",
         "sixth\r\nwindows\r\nlines\r\n"]


# ---------------------------------------------------------------- exact ids

def test_cut_points_keep_the_ids_exact():
    # Random texts of the characters that matter to the pre-tokenizer, cut at every safe point.
    enc = gpt2_encoding()
    rng = random.Random(0)
    alphabet = list("ab Z9'\n\n  \t.,!") + ["\u00a0", "\u3000", "é", "東", "🙂", "\r\n", "'s", "'ll", "\x85", "\x1c"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        data = text.encode()
        whole = enc.encode_ordinary(text)
        for end in range(1, len(data) + 1):
            cut = safe_cut(data[:end])
            if cut:
                assert enc.encode_ordinary(data[:cut].decode()) + enc.encode_ordinary(data[cut:].decode()) == whole, \
                    (text, cut)


def test_many_pieces_and_workers_give_the_whole_texts_ids(tmp_path):
    # Tiny Shakespeare in pieces of 4 KiB over 2 workers: nanoGPT's ids exactly.
    prepare(tmp_path, f"--input={SHAKESPEARE}", "--chunk_bytes=4096", "--num_proc=2")
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.9)
    enc = gpt2_encoding()
    assert splits(tmp_path) == [enc.encode_ordinary(text[:cut]), enc.encode_ordinary(text[cut:])]


def test_workers_fork_only_from_a_single_threaded_process():
    code = ("import threading; from trainer.prepare.workers import start_method; alone = start_method(); "
            "threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start(); "
            "print(alone, start_method())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fork", "spawn"]
    out = subprocess.run([sys.executable, "-c", "import pyarrow; from trainer.prepare.workers import start_method; "
                          "print(start_method())"], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["spawn"]


def test_spawned_workers_give_the_same_ids(tmp_path):
    # The spawn path (a process with threads): workers load the tokenizer themselves.
    waiting = threading.Event()
    thread = threading.Thread(target=waiting.wait, daemon=True)
    thread.start()
    assert start_method() == "spawn"
    prepare_corpus(str(SHAKESPEARE), tmp_path / "data" / "ds", num_proc=2, chunk_bytes=1 << 16)
    waiting.set()
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.9)
    enc = gpt2_encoding()
    assert splits(tmp_path) == [enc.encode_ordinary(text[:cut]), enc.encode_ordinary(text[cut:])]


def test_text_files_and_gz_in_a_folder(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        path = folder / f"{i:02d}.txt"
        if i == 2:
            with gzip.open(path.with_suffix(".txt.gz"), "wb") as f:
                f.write(text.encode())
        else:
            path.write_bytes(text.encode())
    prepare(tmp_path, f"--input={folder}", "--val_fraction=0.3", "--chunk_bytes=1024", "--num_proc=2")
    assert splits(tmp_path) == list(reference(TEXTS, 0.3))


def rows(texts):
    return [{"id": i, "text": t} for i, t in enumerate(texts)]


def write_rows(path, records, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "csv":
        import csv
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_rows_formats_are_token_exact(tmp_path, fmt):
    # Two files of rows, one document per row, in file then row order.
    write_rows(tmp_path / f"a.{fmt}", rows(TEXTS[:3]), fmt)
    write_rows(tmp_path / f"b.{fmt}", rows(TEXTS[3:]), fmt)
    prepare(tmp_path, f"--input={tmp_path}/*.{fmt}", "--val_fraction=0.3")
    assert splits(tmp_path) == list(reference(TEXTS, 0.3))


def test_text_field_and_jsonl_gz(tmp_path):
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in TEXTS)
    prepare(tmp_path, f"--input={tmp_path / 'c.jsonl.gz'}", "--text_field=body", "--seed=7")
    assert splits(tmp_path) == list(reference(TEXTS, seed=7))


def test_saved_datasets_folder_and_dataset_dict(tmp_path):
    import datasets
    datasets.Dataset.from_list(rows(TEXTS)).save_to_disk(str(tmp_path / "saved"))
    prepare(tmp_path, f"--input={tmp_path / 'saved'}", "--num_proc=2", "--chunk_bytes=1024")
    assert splits(tmp_path) == list(reference(TEXTS))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(TEXTS[::-1])),
                          "test": datasets.Dataset.from_list(rows(TEXTS[:2]))}).save_to_disk(str(tmp_path / "dd"))
    prepare(tmp_path, f"--input={tmp_path / 'dd'}", name="dd")
    assert splits(tmp_path, "dd") == list(reference(TEXTS[::-1]))
    proc = prepare(tmp_path, f"--input={tmp_path / 'dd'}", "--split=validation", name="x", check=False)
    assert_one_line_error(proc, "has no split 'validation'", "train, test", "--split")


def test_hub_name_offline_is_one_line_error(tmp_path):
    # The real datasets.load_dataset call; offline, a dataset not in the cache cannot load.
    proc = prepare(tmp_path, "--input=hf:nobody/no-such-dataset", check=False)
    assert_one_line_error(proc, "could not load hub dataset nobody/no-such-dataset")


def test_char_tokenizer_many_documents(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text)
    prepare(tmp_path, f"--input={folder}", "--tokenizer=char", "--val_fraction=0.3", "--chunk_bytes=1024",
            "--num_proc=2")
    import pickle
    meta = pickle.loads((tmp_path / "data" / "ds" / "meta.pkl").read_bytes())
    val = set(val_indices(len(TEXTS), 0.3, 1337).tolist())
    expected = []
    for split in (0, 1):
        docs = [t for i, t in enumerate(TEXTS) if (i in val) == split]
        text = "".join(d if d.endswith("\n") or j == len(docs) - 1 else d + "\n" for j, d in enumerate(docs))
        expected.append([meta["stoi"][c] for c in text])
    assert splits(tmp_path) == expected


# ---------------------------------------------------------------- the split

def test_whole_document_split_is_deterministic_and_sized():
    a = val_indices(10_000, 0.0005, 2357)
    assert len(a) == 5 and a.tolist() == val_indices(10_000, 0.0005, 2357).tolist()
    assert a.tolist() != val_indices(10_000, 0.0005, 1).tolist()
    assert len(val_indices(2, 0.01, 0)) == 1  # at least one
    assert len(val_indices(3, 0.99, 0)) == 2  # at most n - 1


# ---------------------------------------------------------------- bad rows and fields

@pytest.mark.parametrize("records, fragment", [
    ([{"text": "ok"}, {"text": 5}, {"text": "ok"}], "line 2 (row 1): field 'text' is a int, not text"),
    ([{"text": "ok"}, {"other": "x"}, {"text": "ok"}], "line 2 (row 1): field 'text' is missing or null"),
    ([{"text": "ok"}, {"text": "ok"}, {"text": None}], "line 3 (row 2): field 'text' is missing or null"),
])
def test_bad_rows_are_one_line_errors(tmp_path, records, fragment):
    path = tmp_path / "bad.jsonl"
    write_rows(path, records, "jsonl")
    proc = prepare(tmp_path, f"--input={path}", check=False)
    assert_one_line_error(proc, str(path), fragment, "--text_field")
    assert not (tmp_path / "data").exists()


def test_missing_field_names_file_row_and_field(tmp_path):
    path = tmp_path / "a.parquet"
    write_rows(path, [{"body": "x"}, {"body": "y"}], "parquet")
    proc = prepare(tmp_path, f"--input={path}", check=False)
    assert_one_line_error(proc, f"{path} row 0 has no field 'text' (its fields: body); pass --text_field=FIELD")


def test_unreadable_rows_file_is_one_line_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "no end\n')
    proc = prepare(tmp_path, f"--input={path}", check=False)
    assert_one_line_error(proc, f"{path} line 2 (row 1): not valid JSON (")


def test_bad_row_in_a_worker_keeps_the_previous_dataset(tmp_path):
    good = tmp_path / "good.jsonl"
    write_rows(good, rows(TEXTS), "jsonl")
    prepare(tmp_path, f"--input={good}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "ds").iterdir()}
    bad = tmp_path / "bad.jsonl"
    write_rows(bad, rows(TEXTS * 50) + [{"text": ["a", "list"]}], "jsonl")
    proc = prepare(tmp_path, f"--input={bad}", "--num_proc=2", "--chunk_bytes=1024", check=False)
    assert_one_line_error(proc, f"{bad} line 301 (row 300): field 'text' is a list, not text")
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "ds").iterdir()} == before


# ---------------------------------------------------------------- a kill mid-way

def prepared_and_a_bigger_corpus(tmp_path, copies):
    """tiny Shakespeare prepared as data/ds, its files' bytes, and a folder of `copies` copies of it."""
    prepare(tmp_path, f"--input={SHAKESPEARE}")
    folder = tmp_path / "data" / "ds"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    big = tmp_path / "big"
    big.mkdir()
    for i in range(copies):
        (big / f"{i:02d}.txt").write_text(SHAKESPEARE.read_text())
    return folder, before, big


def test_kill_midway_keeps_the_previous_dataset(tmp_path):
    folder, before, big = prepared_and_a_bigger_corpus(tmp_path, 12)  # about 13 MB: seconds of work on one core
    proc = subprocess.Popen([sys.executable, str(REPO / "data/prepare.py"), f"--input={big}", "--name=ds",
                             f"--data_dir={tmp_path / 'data'}", "--num_proc=1", "--chunk_bytes=65536"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the new train.bin is being written
        tmps = list(folder.glob(".train.bin.*.tmp"))
        if tmps and tmps[0].stat().st_size > 100_000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmps and proc.returncode == -signal.SIGKILL
    # the killed run's lock stays behind (trainer/lock.py): the next run takes it over
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.endswith(".tmp") and p.name != ".lock"} \
        == before
    # The next run clears the killed run's temp files and writes the whole dataset.
    prepare(tmp_path, f"--input={SHAKESPEARE}", "--val_fraction=0.2")
    assert not list(folder.glob(".*.tmp"))
    assert {p.name for p in folder.iterdir()} == {"train.bin", "val.bin", "meta.pkl"}


def test_full_disk_keeps_the_previous_dataset(tmp_path):
    # A file-size limit makes the writes fail as a full disk does (EFBIG instead of ENOSPC).
    import resource
    folder, before, big = prepared_and_a_bigger_corpus(tmp_path, 3)
    limit = 1 << 20  # train.bin will need about 1.7 MB

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(REPO / "data/prepare.py"), f"--input={big}", "--name=ds",
                           f"--data_dir={tmp_path / 'data'}", "--num_proc=1"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    assert_one_line_error(proc, "could not write", "File too large", "free some disk space",
                          "the previous dataset is kept")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # and no temp file left


# ---------------------------------------------------------------- nanoGPT's prepared datasets

def test_nanogpt_dataset_without_meta_reads_as_gpt2_uint16(tmp_path, capsys):
    # nanoGPT's data/shakespeare/prepare.py writes these two files and no meta.pkl.
    from trainer.data.tokens import TokenData
    enc = gpt2_encoding()
    text = SHAKESPEARE.read_text()[:20_000]
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    np.array(enc.encode_ordinary(text[:18_000]), dtype=np.uint16).tofile(folder / "train.bin")
    np.array(enc.encode_ordinary(text[18_000:]), dtype=np.uint16).tofile(folder / "val.bin")
    data = TokenData(folder, block_size=16)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "no meta.pkl" in notice[0] and "GPT-2 BPE ids, uint16" in notice[0]
    assert (data.vocab_size, data.dtype) == (50257, np.uint16)
    x, y = data.windows("train", [0])
    assert enc.decode(x[0].tolist()) + enc.decode(y[0, -1:].tolist()) == enc.decode(
        np.fromfile(folder / "train.bin", dtype=np.uint16)[:17].tolist())
