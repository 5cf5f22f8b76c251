"""The documented workflow end to end, through the real `deepspeed` launcher on CPU ranks."""
import json
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, deepspeed_cmd, python, run_cmd

pytestmark = pytest.mark.slow  # launches training runs

SHORT = ["--max_iters=200", "--eval_interval=100", "--eval_iters=10", "--log_interval=20"]


def val_losses(stdout):
    """{iteration: val loss} from the trainer's evaluation lines."""
    return {int(m[0]): float(m[1]) for m in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", stdout)}


def read_events(out_dir):
    acc = EventAccumulator(str(out_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def char_run(data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("runs") / "out-char"
    proc = run_cmd(deepspeed_cmd(REPO / "launch/train.py", "--recipe", "shakespeare_char_cpu",
                                 f"--data_dir={data_dir}", f"--out_dir={out_dir}", *SHORT), cwd=REPO)
    return out_dir, proc.stdout


def test_loss_falls_well_below_its_start(char_run):
    _, stdout = char_run
    losses = val_losses(stdout)
    assert sorted(losses) == [0, 100, 200]
    assert losses[0] > 4.0  # about ln(65): an untrained character model
    assert losses[200] < losses[0] - 1.4, losses
    assert re.search(r"iter 200/200: loss [\d.]+, lr [\d.e+-]+, [\d.]+ms/iter, [\d,]+ tok/s, mem [\d.]+\w+, eta", stdout)


def test_run_files_checkpoint_and_plan_exist(char_run):
    out_dir, stdout = char_run
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["n_layer"] == 4 and cfg["max_iters"] == 200 and cfg["dataset"] == "shakespeare_char"
    plan = json.loads((out_dir / "plan.json").read_text())
    assert plan["micro_batch_size"] * plan["grad_accum_per_rank"] * plan["n_devices"] == 12
    latest = (out_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter0000200"  # val improved at the last evaluation
    assert (out_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt").is_file()
    assert "saved checkpoint" in stdout


def test_tensorboard_has_design_tags_at_iteration_steps(char_run):
    out_dir, _ = char_run
    acc = read_events(out_dir)
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "mem/peak_bytes",
                "eval/train_loss", "eval/val_loss"):
        assert tag in scalars, (tag, scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(20, 201, 20))
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [0, 100, 200]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] < lrs[4]  # warmup rises over the first 100 iterations
    texts = {t.split("/")[0] for t in acc.Tags()["tensors"]}
    assert {"config", "plan", "sample"} <= texts, texts


def test_sample_prints_text_from_the_run(char_run):
    out_dir, _ = char_run
    proc = run_cmd(python(REPO / "launch/sample.py", f"--out_dir={out_dir}", "--start=To be",
                          "--num_samples=2", "--max_new_tokens=60", "--temperature=0.8", "--top_k=40"), cwd=REPO)
    samples = [s for s in proc.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2
    assert all(s.strip().startswith("To be") and len(s.strip()) > 40 for s in samples)


def test_one_process_python_run_and_eval_only(data_dir, tmp_path, char_run):
    out_dir, _ = char_run
    # nanoGPT style: positional recipe path, plain python, eval_only on the finished run
    proc = run_cmd(python(REPO / "launch/train.py", "recipes/shakespeare_char_cpu.py", f"--data_dir={data_dir}",
                          f"--out_dir={out_dir}", "--init_from=resume", "--eval_only=True", "--eval_iters=10"),
                   cwd=REPO)
    losses = val_losses(proc.stdout)
    assert list(losses) == [200] and abs(losses[200] - val_losses(char_run[1])[200]) < 1e-4
