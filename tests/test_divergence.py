"""A run that diverges stops with the guard's one line, exit code 2, its last good checkpoint kept and nothing
saved or sampled from non-finite weights; its last scalars are in TensorBoard (the log is closed on every
path out of the loop). A real divergence (a huge learning rate: one finite step blows the weights up, and
the next forward is non-finite) and the injection hook (a weight made NaN right after a finite step)."""
import json

import pytest

from conftest import REPO, copy_run, fails_cleanly, python, run_cmd, tb_scalars, train_args
from trainer.run import checkpoint

SMALL = ("--n_layer=1", "--n_head=2", "--n_embd=32", "--eval_iters=1", "--log_interval=1")


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory):
    """A healthy run with its checkpoint at iteration 2."""
    out = tmp_path_factory.mktemp("diverge") / "run"
    run_cmd(python(*train_args(data_dir, out, "--max_iters=2", "--eval_interval=2", *SMALL)), REPO)
    return out


def checkpoints_of(out):
    root = checkpoint.checkpoint_dir(out)
    return {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_a_real_divergence_stops_with_the_guards_line_and_keeps_the_last_good_checkpoint(good_run, data_dir,
                                                                                            tmp_path):
    """Resumed with learning_rate 1e20 and a sample at every evaluation (where the issue's run ended in a
    "probability tensor contains inf/nan" traceback) and always_save_checkpoint: iteration 3's step is finite and
    blows the weights up; iteration 4's evaluation finds non-finite losses and stops before the sample or the
    save. TensorBoard holds the scalars up to that evaluation."""
    out = copy_run(good_run, tmp_path)
    before = checkpoints_of(out)
    fails_cleanly(train_args(data_dir, out, "--init_from=resume", "--learning_rate=1e20", "--warmup_iters=0",
                             "--max_iters=8", "--eval_interval=2", "--always_save_checkpoint=True",
                             "--sample_max_new_tokens=20", *SMALL),
                  "at iteration 4, found at its evaluation: the run diverged; stopped without saving (last good "
                  "checkpoint: iter0000002); lower --learning_rate")
    assert checkpoints_of(out) == before and checkpoint.latest_tag(out) == "iter0000002"
    assert checkpoint.check_manifest(checkpoint.checkpoint_dir(out) / "iter0000002") is None
    losses = tb_scalars(out, "train/loss")
    assert 3 in losses and 4 in losses  # the last iterations' scalars were flushed on the guard's way out
    assert 4 in tb_scalars(out, "eval/val_loss")


def test_weights_made_non_finite_by_a_step_stop_the_run_at_once(good_run, data_dir, tmp_path):
    """GPT2DS_INJECT_NAN_WEIGHTS=3: a weight turns NaN right after iteration 3's (finite) step; the check after
    the step stops the run there, before the evaluation or the save at iteration 4."""
    out = copy_run(good_run, tmp_path)
    before = checkpoints_of(out)
    fails_cleanly(train_args(data_dir, out, "--init_from=resume", "--max_iters=8", "--eval_interval=4",
                             "--always_save_checkpoint=True", *SMALL),
                  "non-finite weights at iteration 4, found after its step: the run diverged; stopped without saving "
                  "(last good checkpoint: iter0000002)", env={"GPT2DS_INJECT_NAN_WEIGHTS": "3"})
    assert checkpoints_of(out) == before
    assert 3 in tb_scalars(out, "train/loss")  # the iteration before: its scalars flushed on the way out


def test_a_run_stopped_by_the_guard_has_closed_its_log(good_run, data_dir, tmp_path):
    """The loop closes its log on every way out (try/finally): after the guard's stop, in the same process and
    before anything could be collected, TensorBoard's writer is closed and the stopping evaluation's scalar is
    on disk."""
    out = copy_run(good_run, tmp_path)
    args = train_args(data_dir, out, "--init_from=resume", "--learning_rate=1e20", "--warmup_iters=0",
                      "--max_iters=8", "--eval_interval=2", *SMALL)[1:]
    report = json.loads(run_cmd(python(REPO / "tests/stopped_run_log.py", *args), REPO).stdout.strip().splitlines()[-1])
    assert "the run diverged" in report["error"]
    assert report["closed"] == [True]
    assert report["val_steps"][-1] == 4
