"""bench/instruct_task.py: its task (one right answer per record, held-out word lists unseen in training) and one
short seed through the project's commands, with a --variant override that reaches train.py."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import instruct_task  # noqa: E402


def test_task_has_one_answer_per_record_and_unseen_held_out_lists():
    train, held_out = instruct_task.task_records()
    assert len(train) == 3000 and len(held_out) == 200
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    assert {r["instruction"] for r in held_out} == set(instruct_task.OPERATIONS)
    record = {"instruction": "Sort the words.", "input": " tiger apple", "output": " apple tiger"}
    assert instruct_task.OPERATIONS[record["instruction"]](record["input"].split()) == record["output"]
    assert instruct_task.task_records() == (train, held_out)  # the same task for every seed and variant


@pytest.mark.slow
def test_one_seed_with_a_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the commands it launches inherit it
    results = tmp_path / "RESULTS.md"
    instruct_task.main(["--seeds=5", "--max_iters=2", "--variant=--learning_rate=1e-4 --warmup_iters=1",
                        f"--work_dir={tmp_path / 'work'}", f"--results={results}"])
    config = json.loads((tmp_path / "work" / "run-5" / "config.json").read_text())
    assert config["learning_rate"] == 1e-4 and config["warmup_iters"] == 1 and config["seed"] == 5
    answers = (tmp_path / "work" / "answers-5.jsonl").read_text().splitlines()
    assert len(answers) == 200
    text = results.read_text()
    assert "### instruct_task: --learning_rate=1e-4 --warmup_iters=1 (" in text and "| 5 | 0." in text
    assert "| mean ± sd |" in text
