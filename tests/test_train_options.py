"""Training options a finetune uses: early stopping that keeps the best checkpoint, and W&B logging
(offline mode: the same scalars as TensorBoard, read back from W&B's own run file)."""
import html
import json
import re
import struct

import pytest

from conftest import REPO, python, run_cmd, tb_scalars, train_args

pytestmark = pytest.mark.slow  # launches training runs

QUICK = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--eval_iters=2", "--batch_size=4",
         "--sample_max_new_tokens=0", "--always_save_checkpoint=False", "--bias=False"]


def test_early_stop_keeps_the_best_checkpoint_and_counts_across_a_resume(data_dir, tmp_path):
    out = tmp_path / "out"
    first = run_cmd(python(*train_args(data_dir, out, *QUICK, "--max_iters=6", "--eval_interval=3",
                                       "--early_stop=2")), REPO).stdout
    assert "saved checkpoint" in first and "early stop" not in first  # val improved at 3 and 6
    best = (out / "checkpoints" / "latest").read_text().strip()
    assert best == "iter0000006"
    # A learning rate far below fp32's resolution of the weights (biases frozen by bias=False): the weights, and
    # so the val loss, stay exactly the same, so no evaluation after the resume is an improvement.
    second = run_cmd(python(*train_args(data_dir, out, *QUICK, "--max_iters=30", "--eval_interval=3",
                                        "--early_stop=2", "--learning_rate=1e-15", "--decay_lr=False",
                                        "--init_from=resume")), REPO).stdout
    assert "resumed from iteration 6" in second
    # the evaluation of the resumed state was counted before the save, so the 2nd worse one is at 12
    assert "early stop at iteration 12: no better val loss than" in second, second[-2000:]
    assert f"in 2 evaluations; the best checkpoint, {best}, is kept" in second
    assert "saved checkpoint" not in second
    assert (out / "checkpoints" / "latest").read_text().strip() == best
    assert sorted(tb_scalars(out, "eval/val_loss")) == [0, 3, 6, 9, 12]


def test_early_stop_needs_only_improvements_saved():
    proc = run_cmd(python(REPO / "launch/train.py", "--early_stop=3"), REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: early_stop=3 in the overrides keeps the best checkpoint, but always_save_checkpoint=True saves "
        "every evaluation; add --always_save_checkpoint=False")


def wandb_records(run_file):
    """The protobuf records of an offline W&B run file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks
    of records [crc32, length, type, data]; type 1 is a whole record, 2/3/4 its first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_gets_the_tensorboard_scalars_and_samples(data_dir, tmp_path):
    out = tmp_path / "out"  # wandb is in requirements.txt: missing, this fails rather than skips
    run_cmd(python(*train_args(data_dir, out, *QUICK, "--max_iters=4", "--eval_interval=2", "--log_interval=1",
                               "--sample_max_new_tokens=8", "--wandb_log=True", "--wandb_project=tests")),
            REPO, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, {})[step] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    for tag in ("train/loss", "train/lr", "eval/val_loss", "eval/train_loss", "perf/tokens_per_sec"):
        expected = tb_scalars(out, tag)
        assert expected and sorted(history[tag]) == sorted(expected), tag
        assert all(history[tag][s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), tag
    # a sample is an HTML file per evaluation, holding the text TensorBoard got
    assert sorted(history["sample/_type"]) == [0, 2, 4] and set(history["sample/_type"].values()) == {"html-file"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"tensors": 0})
    events.Reload()
    (last,) = [e for e in events.Tensors("sample/text_summary") if e.step == 4]
    text = last.tensor_proto.string_val[0].decode()[len("```\n"):-len("\n```")]
    page = (run_file.parent / "files" / history["sample/path"][4]).read_text()
    assert f"<pre>{html.escape(text)}</pre>" in page
    assert config["config"]["out_dir"] == str(out) and config["plan"]["mode"] == "full"
    assert re.fullmatch(r"\d+", str(config["plan"]["micro_batch_size"]))


def test_wandb_asked_for_but_missing_is_one_line(data_dir, tmp_path):
    shim = tmp_path / "no-wandb" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    out = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out, *QUICK, "--max_iters=2", "--wandb_log=True")), REPO,
                   check=False, env={"PYTHONPATH": str(shim.parent)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: wandb_log=True but the wandb package is not installed; "
                                                    "pip install wandb, or leave --wandb_log=False (TensorBoard "
                                                    "logs either way)")
    assert not out.exists()  # refused before anything was written
