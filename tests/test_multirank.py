"""Two CPU ranks with ZeRO-2 and ZeRO-3 sharding train like one rank; torchrun's two ranks like the
deepspeed launcher's.

The data stream is drawn globally (trainer/data.py), so one rank and two ranks see the same
windows each iteration; without dropout the only difference is the order of floating-point
reductions. Measured on the CI machine: |val(2 ranks) - val(1 rank)| below 1e-4 after
30 and 60 iterations; the test allows 2e-3.
"""
import sys
from pathlib import Path

import pytest

from conftest import REPO, deepspeed_cmd, run_cmd
from test_train_e2e import val_losses

pytestmark = pytest.mark.slow  # launches training runs

TOLERANCE = 2e-3
RUN = ["--recipe", "shakespeare_char_cpu", "--max_iters=30", "--eval_interval=30", "--eval_iters=10",
       "--log_interval=10", "--warmup_iters=5", "--lr_decay_iters=30", "--sample_max_new_tokens=0"]


def launch(data_dir, out_dir, num_gpus, zero_stage, *extra):
    cmd = deepspeed_cmd(REPO / "launch/train.py", *RUN, f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                        f"--zero_stage={zero_stage}", *extra, num_gpus=num_gpus)
    proc = run_cmd(cmd, cwd=REPO)
    # DeepSpeed's CPU all-reduce makes a 66 MiB /dev/shm file per rank, named by the master port, and never
    # removes it; the trainer unlinks each once every rank has mapped it (trainer/ranks.py)
    port = cmd[cmd.index("--master_port") + 1]
    if Path("/dev/shm").is_dir():
        assert not [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    return val_losses(proc.stdout), proc.stdout


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    return launch(data_dir, tmp_path_factory.mktemp("r1") / "out", 1, 0)[0]


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    """The deepspeed launcher's two ranks with ZeRO-2: (val losses, stdout, out_dir)."""
    out_dir = tmp_path_factory.mktemp("r2") / "out"
    return (*launch(data_dir, out_dir, 2, 2), out_dir)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_rank(data_dir, tmp_path, one_rank, two_ranks, zero_stage):
    out_dir = two_ranks[2] if zero_stage == 2 else tmp_path / "out"
    losses, stdout = two_ranks[:2] if zero_stage == 2 else launch(data_dir, out_dir, 2, zero_stage)
    assert "x 2 ranks" in stdout and f'"zero_stage": {zero_stage}' in (out_dir / "plan.json").read_text()
    assert one_rank[30] < one_rank[0] - 0.8  # it trained
    assert abs(losses[30] - one_rank[30]) < TOLERANCE, (losses, one_rank)
    assert abs(losses[0] - one_rank[0]) < 1e-4  # same initial weights, same evaluation windows


def test_torchrun_trains_like_the_deepspeed_launcher(data_dir, tmp_path, two_ranks):
    """nanoGPT's multi-GPU command, `torchrun --standalone --nproc_per_node=N train.py ...`, with launch/train.py:
    the same ranks, the same losses as under `deepspeed` (docs/multinode.md)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = run_cmd([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "launch/train.py"), *RUN,
                    f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--zero_stage=2"], cwd=REPO)
    assert "x 2 ranks" in proc.stdout
    assert val_losses(proc.stdout) == two_ranks[0]
