"""launch/eval.py: loss and perplexity against transformers' own loss on the same tokens."""
import json
import math
import re

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import REPO, SHAKESPEARE, python, run_cmd
from trainer.data.tokenizer import gpt2_encoding


def eval_json(*args, cwd):
    proc = run_cmd(python(REPO / "launch/eval.py", *args, "--json"), cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_stream_loss(model, tokens, block_size):
    """Mean token loss by transformers' labels= loss, over windows of block_size + 1 overlapping by one."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block_size):
            chunk = torch.tensor([tokens[start:start + block_size + 1]])
            n = chunk.size(1) - 1
            total += model(input_ids=chunk, labels=chunk).loss.item() * n
            count += n
    return total / count, count


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "general.txt"
    path.write_text(SHAKESPEARE.read_text()[:3000])
    return path


def test_text_perplexity_equals_transformers_loss(tiny_gpt2_dir, text_file, tmp_path):
    report = eval_json(f"--out_dir={tiny_gpt2_dir}", f"--text={text_file}", "--block_size=64", cwd=tmp_path)
    (result,) = report["results"]
    tokens = gpt2_encoding().encode_ordinary(text_file.read_text())
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    loss, count = hf_stream_loss(model, tokens, 64)
    assert result["tokens"] == count == len(tokens) - 1  # every token but the first, once
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)


@pytest.fixture(scope="module")
def instruction_run(tiny_gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("instr-run")
    words = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]
    records = [{"instruction": f"Name the colour number {i}.", "input": w, "output": f"The colour is {w}."}
               for i, w in enumerate(words * 6)]
    (root / "colours.json").write_text(json.dumps(records))
    run_cmd(python(REPO / "data/prepare.py", f"--input={root / 'colours.json'}", "--name=colours",
                   "--format=instructions", "--block_size=64", "--val_fraction=0.25", f"--data_dir={root}"), cwd=root)
    out = root / "out"
    run_cmd(python(REPO / "launch/train.py", f"--init_from={tiny_gpt2_dir}", "--dataset=colours", f"--data_dir={root}",
                   f"--out_dir={out}", "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=1",
                   "--max_iters=4", "--eval_interval=4", "--eval_iters=2", "--learning_rate=1e-3", "--mode=full",
                   "--always_save_checkpoint=True", "--sample_max_new_tokens=0", "--tensorboard=False"), cwd=root)
    return root, out


@pytest.mark.slow
def test_instruction_eval_uses_the_training_masking(instruction_run, tmp_path):
    """The packed val split scored by eval.py = each val example scored alone by transformers, responses only."""
    from trainer.tools.loading import load_for_inference
    root, out = instruction_run
    (result,) = eval_json(f"--out_dir={out}", cwd=tmp_path)["results"]  # the run's own dataset by default
    assert result["data"] == "colours val (instruction blocks, response tokens)"

    lm = load_for_inference(str(out)).lm
    tokens = np.fromfile(root / "colours" / "val.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(root / "colours" / "val_mask.bin", dtype=np.uint8)
    pos = np.fromfile(root / "colours" / "val_pos.bin", dtype=np.uint16)
    starts = list(np.nonzero(pos == 0)[0]) + [len(tokens)]
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in zip(starts, starts[1:]):
            if not mask[a:b].any():
                continue  # padding
            ids = torch.from_numpy(tokens[a:b])[None]
            labels = ids.clone()
            labels[0, torch.from_numpy(mask[a:b] == 0)] = -100  # the prompt carries no loss
            n = int(mask[a:b].sum())
            total += lm(input_ids=ids, labels=labels).loss.item() * n
            count += n
    assert result["tokens"] == count == int(mask.sum())
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_compare_base_prints_the_change(instruction_run, tiny_gpt2_dir, text_file, tmp_path):
    _, out = instruction_run
    proc = run_cmd(python(REPO / "launch/eval.py", f"--out_dir={out}", f"--text={text_file}", "--compare_base"),
                   cwd=tmp_path)
    number = r"([-+]?[\d.]+(?:e[-+]?\d+)?)"
    run = re.search(rf"^text {re.escape(str(text_file))}: loss {number}, perplexity {number} \(", proc.stdout, re.M)
    base = re.search(rf"^  base {re.escape(str(tiny_gpt2_dir))}: loss {number}, perplexity {number}$", proc.stdout, re.M)
    change = re.search(rf"^  change: loss {number}, perplexity {number} \({number}%\)$", proc.stdout, re.M)
    assert run and base and change, proc.stdout
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    loss, _ = hf_stream_loss(model, gpt2_encoding().encode_ordinary(text_file.read_text()), 64)  # the run's block
    assert float(base[1]) == pytest.approx(loss, abs=2e-6)
    assert float(change[1]) == pytest.approx(float(run[1]) - float(base[1]), abs=2e-6)
    assert float(change[3]) == pytest.approx(100 * (float(run[2]) / float(base[2]) - 1), abs=0.1)


@pytest.mark.slow
def test_generate_compare_base_answers_with_the_starting_model(instruction_run, tiny_gpt2_dir, tmp_path):
    """--generate --compare_base: the base's answers are the starting model's own greedy answers (transformers'
    generate on the same prompts), scored against the same references, and the change is the difference."""
    from trainer.data.tokenizer import GPT2_EOT, Gpt2Tokenizer
    from trainer.metrics import answer_metrics
    _, out = instruction_run
    answers = tmp_path / "answers.jsonl"
    (result,) = eval_json(f"--out_dir={out}", "--generate", "--compare_base", "--max_new_tokens=6",
                          f"--predictions={answers}", cwd=tmp_path)["results"]
    assert result["base"]["model"] == str(tiny_gpt2_dir)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == result["answers"] > 0
    base, tok = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval(), Gpt2Tokenizer()
    for row in rows:
        ids = torch.tensor([tok.encode(row["prompt"])])
        new = base.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=GPT2_EOT,
                            eos_token_id=GPT2_EOT)[0, ids.shape[1]:].tolist()
        assert row["base_prediction"] == tok.decode(new[:new.index(GPT2_EOT)] if GPT2_EOT in new else new)
    before = answer_metrics([r["base_prediction"] for r in rows], [r["reference"] for r in rows])
    assert {k: result["base"][k] for k in before} == pytest.approx(before)
    assert result["change"] == pytest.approx({k: result[k] - before[k] for k in before})


def test_eval_errors_are_one_line(tiny_gpt2_dir, tmp_path):
    proc = run_cmd(python(REPO / "launch/eval.py", f"--out_dir={tiny_gpt2_dir}", "--compare_base"), cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tiny_gpt2_dir} is not a training run, so it has no dataset: give --dataset=NAME or --text=FILE")


def test_eval_refuses_what_it_cannot_compare(tmp_path):
    import importlib.util
    import pickle
    from types import SimpleNamespace

    from trainer.errors import UserError
    from trainer.data.tokenizer import Gpt2Tokenizer
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "launch/eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    scratch = SimpleNamespace(run_config={"init_from": "scratch"})
    with pytest.raises(UserError, match=r"out-x was trained from scratch: there is no base model to compare with"):
        eval_cli.base_source(SimpleNamespace(base=None, out_dir="out-x"), scratch)
    assert eval_cli.base_source(SimpleNamespace(base="gpt2", out_dir="out-x"), scratch) == "gpt2"
    (tmp_path / "chars").mkdir()
    with open(tmp_path / "chars" / "meta.pkl", "wb") as f:
        pickle.dump({"tokenizer": "char", "vocab_size": 2, "stoi": {"a": 0, "b": 1}, "itos": {0: "a", 1: "b"}}, f)
    with pytest.raises(UserError, match="was prepared with the char tokenizer, but the model uses gpt2; evaluate on"):
        eval_cli.open_dataset(tmp_path / "chars", Gpt2Tokenizer(), 64)
