"""SIGINT/SIGTERM at any moment of a training run: one line, nothing half-written, and the out_dir untouched,
resumable, or reusable by the same command.

Real signals, delivered during the imports (timed), at stages of the setup (GPT2DS_PAUSE_AT makes the setup wait
at a stage until the signal has arrived: trainer/run/fault_injection.py), and during the first evaluation.
Signals during saves are tested in tests/test_faults.py.
"""
import signal
import time

import pytest

from conftest import REPO, python, run_cmd, snapshot, start, train_args, wait_for
from trainer import lock
from trainer.run import checkpoint

pytestmark = pytest.mark.slow  # launches training runs

RUN = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True"]


def stopped_at(sig, stage):
    return (f"interrupted: {sig.name} while {stage}; nothing was trained and no checkpoint saved: run the same "
            f"command again")


def interrupt(args, sig, stage=None, wait_for_lock=None):
    """Start the command, deliver `sig` at `stage` of the setup (or 1 s after it took the lock on `wait_for_lock`:
    during the imports); returns (exit code, everything it printed)."""
    proc = start(python(*args), env={"GPT2DS_PAUSE_AT": stage} if stage else None)
    if stage:
        wait_for(proc, f"paused at: {stage}")
    else:
        deadline = time.monotonic() + 60
        while not (wait_for_lock / lock.LOCK_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the imports take 6-7 s
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def assert_one_line(code, output, sig, line):
    assert code == 128 + sig, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    interrupted = [text for text in output.splitlines() if text.startswith("interrupted:")]
    assert interrupted == [line] and output.strip().splitlines()[-1] == line, output[-3000:]


def test_a_signal_during_the_imports_leaves_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    code, output = interrupt(train_args(data_dir, out, *RUN), signal.SIGINT, wait_for_lock=out)
    assert_one_line(code, output, signal.SIGINT, "interrupted: SIGINT; stopped, nothing left half-written")
    assert not out.exists()  # the lock made it and removed it again


@pytest.mark.parametrize("sig, stage", [(signal.SIGTERM, "loading the model"), (signal.SIGINT, "building the engine")])
def test_a_signal_during_the_setup_leaves_nothing(data_dir, tmp_path, sig, stage):
    out = tmp_path / "out"
    code, output = interrupt(train_args(data_dir, out, *RUN), sig, stage)
    assert_one_line(code, output, sig, stopped_at(sig, stage))
    assert not out.exists()  # nothing was written before the signal; TensorBoard's file opens with the first value


def test_a_run_stopped_after_writing_its_files_is_reusable_and_a_stopped_resume_is_untouched(data_dir, tmp_path):
    """The worst moment of old: the run's files written, no checkpoint yet. The same command starts it again;
    and a resume stopped after it loaded its checkpoint leaves the out_dir as it was."""
    out = tmp_path / "out"
    args = train_args(data_dir, out, *RUN)
    code, output = interrupt(args, signal.SIGINT, "writing the run's files")
    assert_one_line(code, output, signal.SIGINT, stopped_at(signal.SIGINT, "writing the run's files"))
    assert (out / "config.json").is_file() and not checkpoint.complete_tags(out)
    run_cmd(python(*args), REPO)  # reusable by the same command
    assert checkpoint.latest_tag(out) == "iter0000004"

    before = snapshot(out)
    resume = train_args(data_dir, out, *RUN, "--init_from=resume", "--max_iters=6")
    code, output = interrupt(resume, signal.SIGTERM, "loading the checkpoint")
    assert_one_line(code, output, signal.SIGTERM, stopped_at(signal.SIGTERM, "loading the checkpoint"))
    assert snapshot(out) == before  # resumable: nothing changed


def test_a_signal_during_the_first_evaluation_saves_after_one_iteration(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = start(python(*train_args(data_dir, out, "--max_iters=1000", "--eval_interval=1000", "--eval_iters=150")))
    wait_for(proc, "accumulation x 1 ranks)")  # the setup's last line: the evaluation of iteration 0 begins
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert (f"interrupted: saved checkpoint {out / 'checkpoints' / 'iter0000001'} (" in output
            and "resume with the same command and --init_from=resume" in output), output[-3000:]
    assert checkpoint.check_manifest(out / "checkpoints" / "iter0000001") is None
