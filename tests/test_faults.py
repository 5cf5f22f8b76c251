"""Faults a long run meets: NaN steps, signals, kills during saves, a full disk."""
import os
import resource
import signal
import subprocess
import time

import pytest

from conftest import REPO, python, run_cmd, tb_scalars, train_args
from trainer.run import checkpoint

pytestmark = pytest.mark.slow  # launches training runs

QUICK = ["--eval_iters=2", "--log_interval=1", "--sample_max_new_tokens=0"]


@pytest.mark.parametrize("zero_stage", [0, 2])  # the trainer's own guard (stage 0 fp32) and DeepSpeed's
def test_nan_steps_are_skipped_exactly(data_dir, tmp_path, zero_stage):
    """Iterations 5 and 6 get a NaN loss: skipping them leaves the weights of iteration 5 untouched."""
    common = [*QUICK, f"--zero_stage={zero_stage}", "--decay_lr=False"]
    clean = tmp_path / "clean"
    run_cmd(python(*train_args(data_dir, clean, *common, "--max_iters=5", "--eval_interval=5")), REPO)
    poisoned = tmp_path / "poisoned"
    proc = run_cmd(python(*train_args(data_dir, poisoned, *common, "--max_iters=7", "--eval_interval=7")), REPO,
                   env={"GPT2DS_INJECT_NAN": "5,6"})
    assert "iter 6: non-finite loss or gradient norm, step skipped (1 in a row, 1 in all)" in proc.stdout
    assert "iter 7: non-finite loss or gradient norm, step skipped (2 in a row, 2 in all)" in proc.stdout
    assert tb_scalars(poisoned, "train/skipped_steps") == {6: 1.0, 7: 2.0}
    # the same weights: the same val loss on the same fixed evaluation windows
    assert tb_scalars(poisoned, "eval/val_loss")[7] == tb_scalars(clean, "eval/val_loss")[5]


def test_too_many_bad_steps_stop_the_run_keeping_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out, *QUICK, "--max_iters=20", "--eval_interval=4",
                                      "--always_save_checkpoint=True", "--max_bad_steps=3")), REPO,
                   check=False, env={"GPT2DS_INJECT_NAN": "5,6,7,8,9"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 3 non-finite steps in a row up to iteration 8; stopped without saving (last good checkpoint: "
        "iter0000004); lower --learning_rate or check the data, then continue with --init_from=resume")
    assert checkpoint.latest_tag(out) == "iter0000004"


def start(args, env=None):
    """A documented command running in the background, stderr merged so no pipe fills up unread."""
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(proc, marker):
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"never printed {marker!r}: {''.join(seen)[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_exits_cleanly_even_if_repeated(data_dir, tmp_path, sig):
    out = tmp_path / "out"
    proc = start(python(*train_args(data_dir, out, *QUICK, "--max_iters=100000", "--eval_interval=100000")))
    wait_for(proc, "iter 5/")
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)  # a second signal (impatient Ctrl-C) during the save must not break it
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    line = next(l for l in stdout.splitlines() if l.startswith("interrupted: saved checkpoint"))
    assert line.endswith("resume with the same command and --init_from=resume")
    tag = checkpoint.latest_tag(out)
    assert checkpoint.check_manifest(out / "checkpoints" / tag) is None
    if sig == signal.SIGTERM:
        return  # resuming is the same for both signals: checked once, after SIGINT
    resumed = run_cmd(python(*train_args(data_dir, out, *QUICK, f"--max_iters={int(tag[4:]) + 2}",
                                         "--eval_interval=100000", "--init_from=resume")), REPO)
    assert f"resumed from iteration {int(tag[4:])}" in resumed.stdout


def wait_for_save_in_progress(proc, root, timeout=120):
    """Polls until a save has created its temporary folder (the save that is running right now)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(name.startswith(checkpoint.TMP_PREFIX) for name in os.listdir(root)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before a save began: {proc.stdout.read()[-3000:]}")
        time.sleep(0.001)
    raise AssertionError("no save began")


def test_kills_at_many_moments_during_saves_never_lose_the_checkpoint(data_dir, tmp_path):
    """A checkpoint after every evaluation, SIGKILLed again and again at moments spread over a save
    (a 37 MiB save takes about 0.1 s here), counted from the moment its temporary folder appears; each
    time `latest` must name a complete checkpoint, and the next attempt resumes from it."""
    out = tmp_path / "out"
    root = out / "checkpoints"
    args = train_args(data_dir, out, *QUICK, "--n_embd=256", "--n_layer=4", "--eval_interval=1",
                      "--always_save_checkpoint=True", "--max_iters=100000")
    mid_save = 0
    for attempt, delay in enumerate([0.0, 0.01, 0.03, 0.06, 0.1]):
        proc = start(python(*args, *(["--init_from=resume"] if attempt else [])))
        wait_for(proc, "saved checkpoint")  # a first good save of this attempt, which clears leftovers
        wait_for_save_in_progress(proc, root)
        time.sleep(delay)
        proc.kill()
        proc.communicate(timeout=60)
        mid_save += any(p.name.startswith(checkpoint.TMP_PREFIX) for p in root.iterdir())
        tag = checkpoint.latest_tag(out)
        assert tag is not None and checkpoint.check_manifest(root / tag) is None
    assert mid_save >= 2, mid_save  # the kills did land inside saves (the first two all but surely)
    run_cmd(python(*train_args(data_dir, out, *QUICK, "--n_embd=256", "--n_layer=4", "--eval_interval=1000",
                               "--max_iters=" + str(int(checkpoint.latest_tag(out)[4:]) + 1),
                               "--init_from=resume")), REPO)


def limit_file_size(limit):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    base = [*QUICK, "--n_embd=256", "--n_layer=4", "--eval_interval=2", "--always_save_checkpoint=True"]
    run_cmd(python(*train_args(data_dir, out, *base, "--max_iters=2")), REPO)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    # Resume where no file may grow past 1 MB: the next save cannot be written (RLIMIT_FSIZE stands in
    # for a full disk: the same OSError reaches the same code).
    args = [str(a) for a in python(*train_args(data_dir, out, *base, "--max_iters=4", "--init_from=resume",
                                               "--tensorboard=False"))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, preexec_fn=limit_file_size(2**20),
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not save the checkpoint of iteration 4 (")
    assert f"the previous checkpoint {out / 'checkpoints' / 'iter0000002'} is intact" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert checkpoint.check_manifest(out / "checkpoints" / "iter0000002") is None
    assert "Traceback" not in proc.stderr
