"""lm-evaluation-harness on an export: `lm_eval --model hf --model_args pretrained=EXPORT_DIR` (docs/instructions.md)
on a tiny LoRA run exported by launch/merge_adapter.py, over a multiple-choice task of our own (a task YAML over a
local JSONL; nothing downloaded), gives per item the log-likelihoods this project computes for the same choices
from the run itself (trainer/tools/evaluate.continuation_logprob), and so the same accuracy."""
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, python, run_cmd, train_args
from trainer.data.tokenizer import Gpt2Tokenizer
from trainer.tools.evaluate import continuation_logprob
from trainer.tools.loading import load_for_inference

pytestmark = pytest.mark.slow  # a training run, an export and the harness

WORDS = [("apple", "river"), ("stone", "cloud"), ("seven", "green"), ("tiger", "paper"), ("music", "light"),
         ("north", "sand"), ("queen", "bread"), ("candle", "winter")]
TASK = """task: tiny_first_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: Which word comes first in the alphabet, {{{{a}}}} or {{{{b}}}}?\\nAnswer:"
doc_to_choice: "{{{{[a, b]}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_on_an_export_scores_as_this_project(data_dir, tiny_gpt2_dir, tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    run_cmd(python(*train_args(data_dir, run, f"--init_from={tiny_gpt2_dir}", "--dataset=shakespeare", "--mode=lora",
                               "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--learning_rate=1e-2")),
            cwd=REPO)
    run_cmd(python(REPO / "launch/merge_adapter.py", f"--out_dir={run}", f"--export_dir={export}"), cwd=REPO)
    items = [{"a": a, "b": b, "answer": 0 if a < b else 1} for a, b in WORDS]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(items=tmp_path / "items.jsonl"))

    lm_eval = Path(sys.executable).with_name("lm_eval")  # the harness's own command, of this environment
    run_cmd([lm_eval, "--model", "hf", "--model_args", f"pretrained={export}", "--tasks", "tiny_first_word",
             "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--output_path", str(tmp_path / "results"),
             "--log_samples"], cwd=tmp_path,
            env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    (results,) = tmp_path.glob("results/*/results_*.json")
    (samples,) = tmp_path.glob("results/*/samples_tiny_first_word_*.jsonl")
    accuracy = json.loads(results.read_text())["results"]["tiny_first_word"]["acc,none"]
    harness = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in map(json.loads, samples.open())}

    lm, tok = load_for_inference(str(run)).lm, Gpt2Tokenizer()
    ours, right = {}, 0
    for i, item in enumerate(items):
        context = tok.encode_ordinary(f"Question: Which word comes first in the alphabet, {item['a']} or "
                                      f"{item['b']}?\nAnswer:")
        ours[i] = [continuation_logprob(lm, context, tok.encode_ordinary(" " + w)) for w in (item["a"], item["b"])]
        right += max(range(2), key=lambda c: ours[i][c]) == item["answer"]
    assert harness.keys() == ours.keys()
    for i in ours:
        assert ours[i] == pytest.approx(harness[i], abs=1e-4), (i, ours[i], harness[i])
    assert accuracy == right / len(items)
