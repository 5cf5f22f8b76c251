"""Two "nodes" on this machine, each started exactly as DeepSpeed's runner starts a host.

`deepspeed --hostfile=...` runs, on every host (through pdsh, ssh or an MPI/Slurm launcher),
`python -u -m deepspeed.launcher.launch --world_info=<base64 {host: [gpu ids]}> --node_rank=N
--master_addr=... --master_port=... launch/train.py ...` (deepspeed/launcher/multinode_runner.py).
Here both "hosts" are this machine with one CPU rank each, so global rank 1 has local rank 0 and
node rank 1: what a real second node looks like to the trainer.

Losses: the data stream is drawn globally (trainer/data.py), so one rank and two ranks on two nodes
see the same windows; only the order of floating-point reductions differs. Measured here (ZeRO-2 and
ZeRO-3, 20 iterations with a save at 10 and a resume): every train loss within 9.6e-7 of one rank's,
val losses identical; the test allows TOLERANCE = 2e-3, as tests/test_multirank.py does.
"""
import base64
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, deepspeed_cmd, free_port, python, run_cmd, tb_scalars, train_args
from test_train_e2e import val_losses

pytestmark = pytest.mark.slow  # launches training runs

TOLERANCE = 2e-3
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=4",
        "--eval_interval=10", "--log_interval=1", "--always_save_checkpoint=True", "--sample_max_new_tokens=0",
        "--warmup_iters=2", "--lr_decay_iters=20"]


def node_cmd(node_rank, port, *args):
    """What DeepSpeed's runner starts on host `node_rank` of two hosts with one GPU (here: CPU rank) each."""
    world_info = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *map(str, args)]


def two_nodes(args0, args1=None, check=True):
    """Start both "hosts" at once (each with its own train.py arguments); [CompletedProcess of node 0, of node 1]."""
    port = free_port()
    procs = [subprocess.Popen(node_cmd(n, port, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env())
             for n, args in enumerate([args0, args1 or args0])]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    if check:
        for n, proc in enumerate(done):
            assert proc.returncode == 0, f"node {n} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return done


def _env():
    env = dict(os.environ)
    env.pop("RANK", None)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def worst(a, b, steps):
    return max(abs(a[i] - b[i]) for i in steps)


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    """One rank, 20 iterations without a break: train losses and val losses."""
    out = tmp_path_factory.mktemp("one") / "out"
    proc = run_cmd(python(*train_args(data_dir, out, *TINY, "--max_iters=20")), REPO)
    return tb_scalars(out, "train/loss"), val_losses(proc.stdout)


@pytest.mark.parametrize("zero_stage,resume_on", [(2, "two nodes"), (3, "one node of two ranks")])
def test_two_nodes_train_save_and_resume_like_one_rank(data_dir, tmp_path, one_rank, zero_stage, resume_on):
    """Two nodes train to iteration 10 and save; the run resumes to 20 (on two nodes, or one node of two
    ranks: the same two ranks, so no conversion); every loss matches one rank's uninterrupted run."""
    out = tmp_path / "out"
    args = [*train_args(data_dir, out, *TINY, f"--zero_stage={zero_stage}")]
    node0, node1 = two_nodes([*args, "--max_iters=10"])
    assert "x 2 ranks" in node0.stdout and "step 10:" in node0.stdout
    assert "step 10:" not in node1.stdout  # the console is global rank 0's only
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["zero_stage"], plan["n_devices"]) == (zero_stage, 2)
    assert (out / "checkpoints" / "latest").read_text() == "iter0000010"
    assert len(list((out / "checkpoints" / "iter0000010").glob("rng_rank*.pt"))) == 2  # one per global rank
    assert not list(out.glob(".shared-check-*"))  # the check's marker is gone

    if zero_stage == 2:  # another number of nodes too: this checkpoint on one rank (universal format)
        assert_resumes_on_one_rank(tmp_path, out, args, one_rank[0])

    resume = [*args, "--max_iters=20", "--init_from=resume"]
    if resume_on == "two nodes":
        stdout = two_nodes(resume)[0].stdout
    else:
        stdout = run_cmd(deepspeed_cmd(*resume, num_gpus=2), REPO).stdout
    assert "resumed from iteration 10" in stdout and "universal" not in stdout
    train_ref, val_ref = one_rank
    train = tb_scalars(out, "train/loss")
    assert sorted(train) == list(range(1, 21))
    val = {**val_losses(node0.stdout), **val_losses(stdout)}
    print(f"ZeRO-{zero_stage}: worst train loss difference {worst(train, train_ref, range(1, 21)):.2e}, "
          f"val {worst(val, val_ref, (0, 10, 20)):.2e}")
    assert worst(train, train_ref, range(1, 21)) < TOLERANCE, (train, train_ref)
    assert worst(val, val_ref, (0, 10, 20)) < TOLERANCE, (val, val_ref)
    assert train_ref[20] < train_ref[1] - 0.3  # it trained


def assert_resumes_on_one_rank(tmp_path, out, args, train_ref):
    """The two-node ZeRO-2 checkpoint in `out` (a copy of it) continues on one rank through DeepSpeed's
    universal format, every loss matching one rank's uninterrupted run."""
    copy = tmp_path / "one-rank" / "out"
    shutil.copytree(out, copy)
    args = [str(a).replace(str(out), str(copy)) for a in args]
    proc = run_cmd(python(*args, "--max_iters=20", "--init_from=resume"), REPO)
    assert "universal format" in proc.stdout and "resumed from iteration 10" in proc.stdout
    assert worst(tb_scalars(copy, "train/loss"), train_ref, range(1, 21)) < TOLERANCE


def error_lines(proc):
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("what", ["out_dir", "data_dir", "other data"])
def test_a_folder_not_shared_between_nodes_is_refused(data_dir, tmp_path, what):
    """Each "node" sees its own out_dir (or node 1 has no dataset, or another one): one line, printed once by
    rank 0 though only rank 1 sees the problem; exit code 2 on both hosts; nothing left behind."""
    if what == "other data":  # node 1's copy is an older preparation: fewer validation tokens
        other = tmp_path / "other-data" / "shakespeare_char"
        shutil.copytree(data_dir / "shakespeare_char", other)
        val = (other / "val.bin").read_bytes()
        (other / "val.bin").write_bytes(val[:len(val) // 2 * 2 - 200])
        args0 = train_args(data_dir, tmp_path / "a" / "out", *TINY, "--max_iters=10")
        args1 = train_args(other.parent, tmp_path / "a" / "out", *TINY, "--max_iters=10")
        expected = "error: the dataset differs between nodes (node 0 ("
    elif what == "out_dir":
        args0 = train_args(data_dir, tmp_path / "a" / "out", *TINY, "--max_iters=10")
        args1 = train_args(data_dir, tmp_path / "b" / "out", *TINY, "--max_iters=10")
        expected = f"error: out_dir {tmp_path / 'a' / 'out'} is not shared between nodes: node 1 ("
    else:
        args0 = train_args(data_dir, tmp_path / "a" / "out", *TINY, "--max_iters=10")
        args1 = train_args(tmp_path / "no-data", tmp_path / "a" / "out", *TINY, "--max_iters=10")
        expected = "error: on node 1 ("
    node0, node1 = two_nodes(args0, args1, check=False)
    assert (node0.returncode, node1.returncode) == (2, 2), (node0.stderr[-2000:], node1.stderr[-2000:])
    lines = error_lines(node0) + error_lines(node1)
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert error_lines(node0) == lines  # printed by global rank 0, on node 0
    if what == "data_dir":
        assert f"dataset folder {tmp_path / 'no-data' / 'shakespeare_char'} does not exist" in lines[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written, marker removed


@pytest.mark.parametrize("variable", ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"])
def test_a_mistake_is_printed_by_global_rank_0_under_any_launcher(tmp_path, variable):
    """Before torch.distributed starts, an MPI or srun launch has no RANK yet: the global rank comes from the
    launcher's own variable, so rank 1 prints nothing and rank 0 prints the one line."""
    lines = {}
    for rank in (0, 1):
        proc = run_cmd(python(*train_args(tmp_path, tmp_path / "out", "--n_layer=0")), REPO, check=False,
                       env={variable: str(rank)})
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines[rank] = error_lines(proc)
    assert len(lines[0]) == 1 and "n_layer" in lines[0][0] and lines[1] == [], lines
