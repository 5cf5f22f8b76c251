"""Two launches on one machine: the ranks of a launch meet on a TCP port (MASTER_PORT); a second
`deepspeed` launch on a port another run holds is one line naming the port and `--master_port`, and runs
started without a launcher pick their own free port outside the OS's ephemeral range (trainer/launcher.py)."""
import os
import random
import signal
import socket
import subprocess

import pytest

from conftest import REPO, deepspeed_cmd, python, run_cmd, train_args
from trainer.launcher import LAUNCHER_DEFAULT_PORTS, ephemeral_ports, free_port


def test_a_picked_port_is_free_and_outside_the_ephemeral_range():
    ports = [free_port() for _ in range(20)]
    assert not [p for p in ports if p in ephemeral_ports() or p in LAUNCHER_DEFAULT_PORTS]
    with socket.socket() as held:  # a port something listens on is never picked: the next candidate is
        held.bind(("", ports[0]))
        held.listen()
        rng = random.Random()
        choices = iter([ports[0], ports[1]])
        rng.choice = lambda candidates: next(choices)
        assert free_port(rng) == ports[1]


@pytest.mark.slow
def test_a_second_deepspeed_launch_on_a_taken_port_is_one_line(data_dir, tmp_path):
    first_cmd = deepspeed_cmd(*train_args(data_dir, tmp_path / "first", "--max_iters=100000", "--eval_interval=100000",
                                          "--log_interval=100000"), num_gpus=1)
    port = first_cmd[first_cmd.index("--master_port") + 1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    first = subprocess.Popen(first_cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group: the launcher and its rank end together
    try:
        for line in first.stdout:  # the first run holds the port from init_distributed on
            if line.startswith("tokens per iteration"):
                break
        assert first.poll() is None, "the first run ended early"
        second_cmd = deepspeed_cmd(*train_args(data_dir, tmp_path / "second", "--max_iters=1"), num_gpus=1)
        second_cmd[second_cmd.index("--master_port") + 1] = port
        second = run_cmd(second_cmd, cwd=REPO, check=False)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # lines that start with error (torchao's import warns of "an error in a future release" in the middle of one)
    errors = [line for line in second.stderr.splitlines() if line.lower().startswith("error")]
    assert errors == [f"error: port {port}, where the ranks meet (MASTER_PORT), is in use on this machine, probably "
                      f"by another run; launch with another port: deepspeed --master_port={int(port) + 1} ... "
                      f"(torchrun: --master_port={int(port) + 1})"], second.stderr
    assert "Traceback" not in second.stderr and second.returncode != 0
    assert not (tmp_path / "second").exists()  # nothing written


@pytest.mark.slow
def test_two_one_process_runs_at_once_each_pick_a_port(data_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    runs = [subprocess.Popen(python(*train_args(data_dir, tmp_path / f"run{i}", "--max_iters=1", "--eval_iters=1")),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        assert "step 1:" in out
