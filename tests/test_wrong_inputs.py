"""Wrong kinds of input: a model folder of another architecture, weights that are not GPT-2's, malformed records
(named by file and line or row) and text that is not UTF-8 (named by file and byte offset)."""
import json
import re
import shutil

import pytest

from conftest import REPO, fails_cleanly, make_tiny_gpt2, train_args
from trainer.errors import UserError

NOT_GPT2 = "holds a bert model (config.json model_type 'bert'), not a GPT-2; use a GPT-2 folder"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT saved by save_pretrained: a Hugging Face model folder, but not a GPT-2."""
    from transformers import BertConfig, BertForMaskedLM
    path = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_config_bert_weights(bert_dir, tmp_path_factory):
    """A GPT-2's config.json beside a BERT's weights: only the names of the weights tell."""
    path = tmp_path_factory.mktemp("mixed")
    make_tiny_gpt2(path)
    shutil.copy(bert_dir / "model.safetensors", path / "model.safetensors")
    return path


@pytest.mark.slow
def test_sample_refuses_another_architecture(bert_dir, tmp_path):
    fails_cleanly([REPO / "launch/sample.py", f"--init_from={bert_dir}", "--device=cpu"], f"{bert_dir} {NOT_GPT2}",
                  watch=tmp_path)


def test_train_refuses_another_architecture_before_importing_torch(data_dir, bert_dir, tmp_path):
    fails_cleanly(train_args(data_dir, tmp_path / "out", f"--init_from={bert_dir}", "--max_iters=2",
                             recipe="gpt2_small"), f"{bert_dir} {NOT_GPT2}", watch=tmp_path)


def test_every_loader_refuses_another_architecture(bert_dir):
    """eval.py (--out_dir, --compare_base's --base) and sample.py load through load_for_inference; training,
    QLoRA bases and export through load_pretrained."""
    from trainer.model.gpt2 import load_pretrained
    from trainer.tools.loading import load_for_inference
    for load in (load_for_inference, lambda source: load_pretrained(source, 0.0)):
        with pytest.raises(UserError, match=re.escape(NOT_GPT2)):
            load(str(bert_dir))


def test_weights_that_are_not_gpt2s_are_refused_not_left_random(gpt2_config_bert_weights):
    from trainer.model.gpt2 import load_pretrained
    with pytest.raises(UserError) as refused:
        load_pretrained(str(gpt2_config_bert_weights), 0.0)
    assert str(refused.value).startswith(f"the weights in {gpt2_config_bert_weights} are not a GPT-2's of its "
                                         f"config.json: ")
    assert "missing (e.g. lm_head.weight)" in str(refused.value) and "unexpected (e.g. bert." in str(refused.value)


# ---------------------------------------------------------------- malformed records, text that is not UTF-8

def prepare(tmp_path, source, *extra):
    return [REPO / "data/prepare.py", f"--input={source}", "--name=ds", f"--data_dir={tmp_path / 'data'}", *extra]


def records(n=100):
    return [json.dumps({"text": f"record {i} of some text"}) for i in range(n)]


def test_a_broken_jsonl_line_in_the_middle_is_named(tmp_path):
    lines = records()
    lines[41] = '{"text": "no end'
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    fails_cleanly(prepare(tmp_path, path), f"error: {path} line 42 (row 41): not valid JSON (", watch=tmp_path)


def test_a_wrong_field_in_a_jsonl_names_its_line(tmp_path):
    lines = records()
    lines[9] = ""  # a blank line holds no row: row 40 is on line 42
    lines[41] = json.dumps({"text": 5})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    fails_cleanly(prepare(tmp_path, path), f"error: {path} line 42 (row 40): field 'text' is a int, not text",
                  watch=tmp_path)


def test_a_csv_row_with_extra_fields_is_named(tmp_path):
    rows = ["text,n"] + [f"record {i},{i}" for i in range(50)]
    rows[21] = 'a "quoted,1,2,3'
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(rows) + "\n")
    fails_cleanly(prepare(tmp_path, path), f"error: {path} row 20 (line 22): 4 fields where the header has 2",
                  watch=tmp_path)


def test_a_parquet_row_without_text_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), path)
    fails_cleanly(prepare(tmp_path, path), f"error: {path} row 2: field 'text' is missing or null", watch=tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rows_that_are_not_utf8_name_the_byte_offset(tmp_path, suffix):
    text = ("\n".join(records(20)) if suffix == ".jsonl" else "text\n" + "\n".join(f"row {i}" for i in range(50)))
    data = text.encode()
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data[:123] + b"\xe9" + data[123:] + b"\n")
    fails_cleanly(prepare(tmp_path, path), f"error: {path} is not UTF-8 (invalid byte at offset 123); convert it "
                  f"with iconv -t UTF-8", watch=tmp_path)


def test_instruction_records_that_are_not_utf8_name_the_byte_offset(tmp_path):
    data = "\n".join(json.dumps({"instruction": f"say {i}", "output": "ok"}) for i in range(10)).encode()
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(data[:200] + b"\xff" + data[200:])
    fails_cleanly(prepare(tmp_path, path, "--format=instructions"), f"error: {path} is not UTF-8 (invalid byte at "
                  f"offset 200)", watch=tmp_path)


@pytest.mark.parametrize("flag", ["--start", "--input"])
def test_a_prompt_file_that_is_not_utf8_is_one_line_before_loading_anything(tmp_path, flag):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("Bonjour ".encode() + b"\xe7a va")  # latin-1
    extra = ["--prompt_template=alpaca"] if flag == "--input" else []
    fails_cleanly([REPO / "launch/sample.py", "--init_from=gpt2", f"{flag}=FILE:{prompt}", *extra],
                  f"error: {prompt} is not UTF-8 (invalid byte at offset 8); convert it with iconv -t UTF-8",
                  watch=tmp_path)
