"""One writer per folder (trainer/lock.py): a second training, preparation or export is refused in one line naming
the holder; readers are not blocked; a lock left by a killed process (kill -9) or a dead node is taken over."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, deepspeed_cmd, fails_cleanly, python, run_cmd, start, wait_for, train_args
from trainer import lock
from trainer.errors import UserError
from trainer.lock import FolderLock
from trainer.run import checkpoint

HOST = socket.gethostname()


def holder_line(folder, command, pid):
    return f"{folder} is in use by {command} (pid {pid} on {HOST}, since "


def hold_in_child(folder, **kwargs):
    """Another process holding the lock on `folder` until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from trainer.lock import FolderLock; "
            f"FolderLock({str(folder)!r}, 'a test', 'wait', **{kwargs!r}).acquire(); print('held', flush=True); "
            f"time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.slow
def test_a_second_training_is_refused_readers_are_not_and_a_killed_holder_is_taken_over(data_dir, tmp_path):
    out = tmp_path / "out"
    common = ["--eval_interval=10", "--eval_iters=1", "--always_save_checkpoint=True", "--log_interval=100000"]
    first = start(python(*train_args(data_dir, out, *common, "--max_iters=1000000")))
    try:
        wait_for(first, "saved checkpoint")  # training, with a checkpoint a reader can load
        # a resume and a fresh run with overwrite=True (which would delete its checkpoints) are both refused,
        # at once: before anything is read, imported or written
        for extra in (["--init_from=resume"], ["--overwrite=True"]):
            line = fails_cleanly(train_args(data_dir, out, *common, "--max_iters=5", *extra),
                                 holder_line(out, "a training run", first.pid))
            assert line.endswith("; wait for it to finish or stop it, or choose another --out_dir")
        # readers are not blocked
        proc = run_cmd(python(REPO / "launch/sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=3",
                              "--device=cpu"), REPO)
        assert proc.stdout.strip().endswith("---------------")
        # an export reads the run too, but one export_dir takes one export at a time (its lock lies beside it)
        from trainer.tools.export import export
        export_dir = tmp_path / "exported"
        child = hold_in_child(export_dir, lock_file=str(tmp_path / ".exported.lock"))
        try:
            with pytest.raises(UserError, match=re.escape(holder_line(export_dir, "a test", child.pid))):
                export(out, export_dir)
        finally:
            child.kill()
            child.wait()
        assert not export_dir.exists()
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the lock file stays
        first.communicate(timeout=60)
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == first.pid
    tag = checkpoint.latest_tag(out)
    proc = run_cmd(python(*train_args(data_dir, out, *common, "--init_from=resume", f"--max_iters={int(tag[4:]) + 1}")),
                   REPO)
    assert (f"notice: took over the lock on {out} held by a training run (pid {first.pid} on {HOST}, since "
            in proc.stderr and "which no longer runs" in proc.stderr), proc.stderr[-2000:]
    assert f"resumed from iteration {int(tag[4:])}" in proc.stdout
    assert not (out / lock.LOCK_FILE).exists()  # released on the way out


def test_a_held_lock_is_refused_then_taken_over_once_its_holder_is_killed(tmp_path, capsys):
    folder = tmp_path / "out"
    child = hold_in_child(folder)
    try:
        with pytest.raises(UserError) as refused:
            FolderLock(folder, "a training run", "choose another --out_dir").acquire()
        assert str(refused.value).startswith(holder_line(folder, "a test", child.pid))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with FolderLock(folder, "a training run", "choose another --out_dir"):
        held = json.loads((folder / lock.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "a training run"
    notice = capsys.readouterr().err.strip()
    assert notice.startswith(f"notice: took over the lock on {folder} held by a test (pid {child.pid}")
    assert notice.endswith("which no longer runs")
    assert not (folder / lock.LOCK_FILE).exists()
    fresh = tmp_path / "new" / "out"
    with FolderLock(fresh, "a training run", "choose another --out_dir"):
        assert fresh.is_dir()
    assert not (tmp_path / "new").exists()  # the lock made them; nothing else was written, so they are gone again


@pytest.mark.slow
def test_a_two_rank_launch_into_a_held_out_dir_is_refused(data_dir, tmp_path):
    """`deepspeed --num_gpus 2` into an out_dir another writer holds: rank 0 is refused before anything is
    written, the launcher ends the other rank, and the holder keeps its lock."""
    out = tmp_path / "out"
    child = hold_in_child(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        proc = run_cmd(deepspeed_cmd(*train_args(data_dir, out, "--max_iters=2"), num_gpus=2), REPO, check=False)
        assert proc.returncode != 0
        assert f"error: {holder_line(out, 'a test', child.pid)}" in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert sorted(p.name for p in out.iterdir()) == before  # only the holder's lock file
        assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_two_writers_starting_together_one_holds(tmp_path):
    """Four processes try to take one lock at once: exactly one holds it, the others are refused naming it."""
    folder = tmp_path / "out"
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from trainer.lock import FolderLock\n"
            f"from trainer.errors import UserError\ntime.sleep(max(0, float(sys.argv[1]) - time.time()))\n"
            f"try:\n    FolderLock({str(folder)!r}, 'a test', 'wait').acquire(); print('held', flush=True)\n"
            f"    time.sleep(60)\nexcept UserError as e:\n    print('refused', e, flush=True)\n")
    at = str(time.time() + 1.0)  # the same instant for all: after their imports
    children = [subprocess.Popen([sys.executable, "-c", code, at], stdout=subprocess.PIPE, text=True)
                for _ in range(4)]
    results = [child.stdout.readline().strip() for child in children]  # the holder holds until it is killed
    for child in children:
        child.kill()
        child.communicate(timeout=60)
    held = [child.pid for child, result in zip(children, results) if result == "held"]
    assert len(held) == 1, results
    assert all(r.startswith(f"refused {holder_line(folder, 'a test', held[0])}") for r in results if r != "held")


def write_foreign_lock(folder, age_s):
    """A lock file as a process on another node writes it, its last heartbeat `age_s` seconds ago."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock.LOCK_FILE
    since = time.time() - 3600
    path.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": since, "since": since,
                                "command": "a training run", "pid_namespace": ""}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_lock_of_another_node_is_stale_only_once_its_heartbeat_stopped(tmp_path, capsys):
    folder = tmp_path / "out"
    write_foreign_lock(folder, age_s=20)
    with pytest.raises(UserError) as refused:
        FolderLock(folder, "a training run", "choose another --out_dir").acquire()
    assert "in use by a training run (pid 4242 on node-7, since" in str(refused.value)
    assert f"(its heartbeat is 20 s old; if its node is down, the lock is taken over once that reaches 300 s, or " \
           f"delete {folder / lock.LOCK_FILE})" in str(refused.value)
    write_foreign_lock(folder, age_s=lock.STALE_AFTER_S + 100)
    with FolderLock(folder, "a training run", "choose another --out_dir"):
        pass
    notice = capsys.readouterr().err
    assert "held by a training run (pid 4242 on node-7" in notice and "whose heartbeat stopped 400 s ago" in notice


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    with FolderLock(tmp_path / "out", "a training run", "choose another --out_dir") as held:
        first = os.stat(held.path).st_mtime_ns
        os.utime(held.path, ns=(first - 10**10, first - 10**10))  # ten seconds back
        time.sleep(0.5)
        assert os.stat(held.path).st_mtime_ns > first - 10**10


def test_a_second_preparation_of_a_dataset_is_refused(tmp_path):
    dataset = tmp_path / "data" / "ds"
    child = hold_in_child(dataset, heartbeat_thread=False)
    try:
        fails_cleanly([REPO / "data/prepare.py", f"--input={REPO / 'data/tinyshakespeare.txt'}", "--name=ds",
                       f"--data_dir={tmp_path / 'data'}"], holder_line(dataset, "a test", child.pid), watch=dataset)
    finally:
        child.kill()
        child.wait()
