"""Data preparation: the real prepare scripts on real files, and the tokenizers."""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `pytest` without -m does not put the repo on sys.path

from trainer.data.tokenizer import gpt2_bpe_files, gpt2_encoding, load_tokenizer  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.prepare.output import token_dtype  # noqa: E402
from trainer.prepare.shakespeare import download_tiny_shakespeare  # noqa: E402

# Tiny Shakespeare ships with the repo (data/tinyshakespeare.txt).
from conftest import SHAKESPEARE as TINY_SHAKESPEARE  # noqa: E402


def run_script(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    # A foreign cwd proves the scripts find the repo from their own location.
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True, text=True, cwd=cwd or REPO.parent, timeout=120,
    )


def load_dataset(folder: Path):
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    train = np.fromfile(folder / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(folder / "val.bin", dtype=meta["dtype"])
    return meta, train, val


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def shakespeare_text() -> Path:
    assert TINY_SHAKESPEARE.is_file(), f"test data missing: {TINY_SHAKESPEARE}"
    return TINY_SHAKESPEARE


# ---------------------------------------------------------------- tokenizers

def test_gpt2_encoding_known_ids():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    # Data is encoded with encode_ordinary: a literal marker stays text.
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")
    text = "naïve café — 東京 🙂 ∑x²"
    assert enc.decode(enc.encode(text)) == text


def test_gpt2_ranks_are_tiktokens_data_gym_ranks():
    # Our loader reads encoder.json alone; tiktoken's derives the ranks from vocab.bpe's merges and checks them.
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    folder = gpt2_bpe_files()
    reference = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(folder / "vocab.bpe"),
                                                encoder_json_file=str(folder / "encoder.json"))
    assert gpt2_encoding()._mergeable_ranks == reference


def test_load_tokenizer_gpt2_and_char():
    gpt2 = load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"})
    assert (gpt2.eot_token, gpt2.vocab_size) == (50256, 50257)
    assert gpt2.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    assert gpt2.decode([15496, 995]) == "Hello world"

    chars = sorted(set("hello"))
    char = load_tokenizer({"tokenizer": "char", "vocab_size": len(chars),
                           "stoi": {c: i for i, c in enumerate(chars)}, "itos": dict(enumerate(chars))})
    assert (char.eot_token, char.vocab_size) == (None, 4)
    assert char.decode(char.encode("hello")) == "hello"
    with pytest.raises(ValueError, match="not in this dataset's vocabulary"):
        char.encode("z")


def test_load_tokenizer_reads_nanogpt_char_meta():
    # nanoGPT's shakespeare_char meta.pkl has no 'tokenizer' key.
    tok = load_tokenizer({"vocab_size": 2, "stoi": {"a": 0, "b": 1}, "itos": {0: "a", 1: "b"}})
    assert tok.encode("ab") == [0, 1]


# ---------------------------------------------------------------- tiny Shakespeare

def test_shakespeare_gpt2_counts(tmp_path, shakespeare_text):
    proc = run_script("data/shakespeare/prepare.py", f"--input={shakespeare_text}", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "train has 301,966 tokens" in proc.stdout
    assert "val has 36,059 tokens" in proc.stdout
    out = tmp_path / "shakespeare"
    meta, train, val = load_dataset(out)
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}
    assert (out / "train.bin").stat().st_size == 301_966 * 2
    assert (out / "val.bin").stat().st_size == 36_059 * 2
    # nanoGPT's split: the first 90% of the characters train.
    text = shakespeare_text.read_text()
    tok = load_tokenizer(meta)
    assert tok.decode(train.tolist()) == text[:int(len(text) * 0.9)]
    assert tok.decode(val.tolist()) == text[int(len(text) * 0.9):]
    assert train[:8].tolist() == [5962, 22307, 25, 198, 8421, 356, 5120, 597]  # nanoGPT's first ids
    assert not list(out.glob(".*.tmp"))


def test_shakespeare_char_counts(tmp_path, shakespeare_text):
    proc = run_script("data/shakespeare_char/prepare.py", f"--input={shakespeare_text}", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "shakespeare_char"
    meta, train, val = load_dataset(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("char", 65, "uint16")
    assert len(meta["stoi"]) == len(meta["itos"]) == 65
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert (out / "train.bin").stat().st_size == 1_003_854 * 2
    text = shakespeare_text.read_text()
    tok = load_tokenizer(meta)
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text


def test_shakespeare_default_input_is_the_shipped_copy(tmp_path):
    # No --input and no input.txt: the repo's data/tinyshakespeare.txt, no network.
    assert TINY_SHAKESPEARE == REPO / "data" / "tinyshakespeare.txt"
    proc = run_script("data/shakespeare/prepare.py", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout and "train has 301,966 tokens" in proc.stdout


def test_shakespeare_uses_local_input_txt_without_download(tmp_path):
    # With no --input, an input.txt already in the dataset folder is used.
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    (folder / "input.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    proc = run_script("data/shakespeare_char/prepare.py", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout
    assert (folder / "val.bin").is_file()


def test_download_failure_is_one_clear_error(tmp_path):
    # Port 9 on localhost refuses at once: an offline machine without waiting.
    dest = tmp_path / "input.txt"
    with pytest.raises(UserError) as e:
        download_tiny_shakespeare(dest, url="http://127.0.0.1:9/input.txt", timeout=2)
    message = str(e.value)
    assert message.startswith("could not download tiny Shakespeare (")
    assert message.endswith("); pass --input=path/to/input.txt")
    assert "\n" not in message
    assert not dest.exists()


# ---------------------------------------------------------------- data/prepare.py

@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha line one\nalpha line two\n" * 30)
    (folder / "sub" / "b.md").write_text("beta café ünïcode\n" * 30)
    (folder / "c.txt").write_text("")  # empty files are skipped
    (folder / ".hidden.txt").write_text("never read\n")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    return folder


def expected_text(corpus: Path) -> str:
    # Sorted order of the full paths: a.txt, c.txt (empty), sub/b.md.
    return (corpus / "a.txt").read_text() + (corpus / "sub" / "b.md").read_text()


def test_prepare_folder_gpt2(tmp_path, corpus):
    data_dir = tmp_path / "data"
    proc = run_script("data/prepare.py", f"--input={corpus}", "--name=mine", f"--data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr
    meta, train, val = load_dataset(data_dir / "mine")
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}
    tok = load_tokenizer(meta)
    # Two documents: split by whole documents, one in each split (no <|endoftext|> within a split).
    texts = sorted([tok.decode(train.tolist()), tok.decode(val.tolist())])
    assert texts == sorted([(corpus / "a.txt").read_text(), (corpus / "sub" / "b.md").read_text()])
    assert 50256 not in train and 50256 not in val


def test_prepare_glob_char_val_fraction(tmp_path, corpus):
    data_dir = tmp_path / "data"
    proc = run_script("data/prepare.py", f"--input={corpus}/**/*.md", "--name=md", "--tokenizer=char",
                      "--val_fraction=0.25", f"--data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr
    meta, train, val = load_dataset(data_dir / "md")
    text = (corpus / "sub" / "b.md").read_text()
    assert meta["vocab_size"] == len(set(text)) == len(meta["itos"])
    assert (len(train), len(val)) == (int(len(text) * 0.75), len(text) - int(len(text) * 0.75))
    tok = load_tokenizer(meta)
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text


def test_prepare_char_keeps_files_on_separate_lines(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "1.txt").write_text("no newline at the end")
    (folder / "2.txt").write_text("second file\n")
    proc = run_script("data/prepare.py", f"--input={folder}", "--name=c", "--tokenizer=char",
                      "--val_fraction=0.5", f"--data_dir={tmp_path / 'data'}")
    assert proc.returncode == 0, proc.stderr
    meta, train, val = load_dataset(tmp_path / "data" / "c")
    tok = load_tokenizer(meta)
    # Whole documents: one in each split; a newline is in the vocabulary, to join documents.
    assert sorted([tok.decode(train.tolist()), tok.decode(val.tolist())]) == ["no newline at the end", "second file\n"]
    assert "\n" in meta["stoi"]


def test_non_utf8_file_is_one_line_error_and_writes_nothing(tmp_path, corpus):
    bad = corpus / "latin1.txt"
    bad.write_bytes("ok so far\n".encode() + "caf\xe9\n".encode("latin-1"))
    data_dir = tmp_path / "data"
    proc = run_script("data/prepare.py", f"--input={corpus}", "--name=bad", f"--data_dir={data_dir}")
    assert_one_line_error(proc, f"{bad} is not UTF-8", "invalid byte at offset 13", "iconv -t UTF-8")
    assert not data_dir.exists()


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_input_is_one_line_error(tmp_path, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    proc = run_script("data/prepare.py", f"--input={empty}", "--name=e", f"--data_dir={tmp_path / 'data'}")
    assert_one_line_error(proc, "no text in", str(empty))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--format=instructions"], "line 1: not valid JSON"),  # text is not instruction records
    (["--format=csv"], "unknown --format=csv"),
    (["--tokenizer=bpe"], "unknown --tokenizer=bpe"),
    (["--val_fraction=1.5"], "--val_fraction must be between 0 and 1"),
    (["--name=../escape"], "--name must be a plain folder name"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, corpus, args, fragment):
    base = {"--input": corpus, "--name": "ok", "--data_dir": tmp_path / "data"}
    overridden = {a.split("=", 1)[0] for a in args}
    argv = [f"{k}={v}" for k, v in base.items() if k not in overridden] + args
    proc = run_script("data/prepare.py", *argv)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "data").exists()


def test_missing_input_is_one_line_error(tmp_path):
    proc = run_script("data/prepare.py", f"--input={tmp_path / 'nope'}", "--name=x")
    assert_one_line_error(proc, "input not found")
    proc = run_script("data/prepare.py", f"--input={tmp_path}/*.txt", "--name=x")
    assert_one_line_error(proc, "no files match")


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(50257) == "uint16"
    assert token_dtype(100_277) == "uint32"
