"""Out of memory during a step: the plan steps down and the run goes on with nothing lost.

GPT2DS_INJECT_OOM (trainer/run/fault_injection.py) raises a real torch.OutOfMemoryError in the last micro-batch
of the listed iterations, after the earlier micro-batches' gradients are accumulated. Without
dropout the run is deterministic, so "nothing lost" is exact: every iteration's training loss
equals the uninterrupted run's (the console prints 4 decimals; two ranks differ from one only
by the order of floating-point sums, measured below 1e-4).
"""
import json
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, deepspeed_cmd, python, run_cmd, train_args

ITERS = 6
RUN = [f"--max_iters={ITERS}", f"--eval_interval={ITERS}", "--eval_iters=2", "--log_interval=1",
       "--warmup_iters=2", "--sample_max_new_tokens=0"]  # shakespeare_char_cpu: 12 sequences x 1


def train_losses(stdout):
    """[(iteration, loss)] from the console lines, in order (an iteration printed twice shows twice)."""
    return [(int(i), float(loss)) for i, loss in re.findall(rf"iter (\d+)/{ITERS}: loss ([\d.]+)", stdout)]


def val_loss(stdout):
    return float(re.findall(rf"step {ITERS}: train loss [\d.]+, val loss ([\d.]+)", stdout)[0])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    return run_cmd(python(*train_args(data_dir, out, *RUN)), cwd=REPO).stdout


@pytest.mark.slow
def test_checkpointing_then_micro_batch_in_place(data_dir, tmp_path, reference):
    out = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out, *RUN)), cwd=REPO, env={"GPT2DS_INJECT_OOM": "2,4"})
    losses = train_losses(proc.stdout)
    assert [i for i, _ in losses] == list(range(1, ITERS + 1))  # same iteration count, none skipped or repeated
    assert losses == train_losses(reference), (losses, train_losses(reference))
    assert val_loss(proc.stdout) == val_loss(reference)
    assert "out of memory (CUDA out of memory (injected by GPT2DS_INJECT_OOM at iteration 2)). iteration 2: " \
           "out of memory with full, ZeRO-0, micro-batch 12: turned gradient checkpointing on" in proc.stdout
    assert "iteration 4: out of memory with full, ZeRO-0, checkpointing, micro-batch 12: micro-batch 12 -> 6, " \
           "accumulation 2 per rank" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["gradient_checkpointing"], plan["micro_batch_size"], plan["grad_accum_per_rank"]) == (True, 6, 2)
    assert [(h["iteration"], h["engine_rebuilt"]) for h in plan["history"]] == [(2, False), (4, False)]
    assert plan["history"][1]["from"]["micro_batch_size"] == 12 and plan["history"][1]["to"]["micro_batch_size"] == 6
    events = EventAccumulator(str(out), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("plan/text_summary")] == [0, 2, 4]


@pytest.mark.slow
def test_bf16_zero0_steps_down_in_place_on_deepspeeds_bf16_optimizer(data_dir, tmp_path):
    """bf16 at ZeRO-0 runs DeepSpeed's BF16_Optimizer, whose engine DeepSpeed builds as ZeRO-1: the step-down
    still keeps that engine (it asks the plan's path, not the engine's stage) and drops the first micro-batch's
    gradient from BF16_Optimizer's fp32 buffer. Two micro-batches per iteration, so that buffer holds one when
    the error comes: kept, iteration 2's update would count it twice and the losses from iteration 3 on would
    part from the uninterrupted run's. Checkpointing recomputes the same bf16 forward, so they are equal."""
    bf16 = [*RUN, "--dtype=bf16", "--master_weights=fp32", "--micro_batch_size=6"]
    ref = run_cmd(python(*train_args(data_dir, tmp_path / "ref", *bf16)), cwd=REPO).stdout
    out = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out, *bf16)), cwd=REPO, env={"GPT2DS_INJECT_OOM": "2"})
    losses = train_losses(proc.stdout)
    assert [i for i, _ in losses] == list(range(1, ITERS + 1))
    assert losses == train_losses(ref), (losses, train_losses(ref))
    assert val_loss(proc.stdout) == val_loss(ref)
    assert "micro-batch 6: turned gradient checkpointing on; redoing the iteration\n" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["dtype"], plan["zero_stage"], plan["grad_accum_dtype"], plan["grad_accum_per_rank"]) == \
        ("bf16", 0, "fp32", 2)
    assert [(h["iteration"], h["engine_rebuilt"]) for h in plan["history"]] == [(2, False)]
    info = json.loads(next((out / "checkpoints").glob("iter*/info.json")).read_text())
    assert (info["zero_stage"], info["engine_zero_stage"]) == (0, 1)  # the engine is DeepSpeed's ZeRO-1


@pytest.mark.slow
def test_zero_stage_changes_rebuild_the_engine_with_its_state(data_dir, tmp_path, reference):
    """Two ranks, checkpointing and micro-batch fixed: each step-down raises the ZeRO stage (0 -> 1 -> 2 -> 3),
    a new engine given the old one's fp32 weights and Adam moments; the losses go on as without the errors."""
    out = tmp_path / "out"
    proc = run_cmd(deepspeed_cmd(*train_args(data_dir, out, *RUN, "--micro_batch_size=3",
                                             "--gradient_checkpointing=True"), num_gpus=2),
                   cwd=REPO, env={"GPT2DS_INJECT_OOM": "2,3,4"})
    losses, ref = train_losses(proc.stdout), dict(train_losses(reference))
    assert [i for i, _ in losses] == list(range(1, ITERS + 1))
    assert all(abs(loss - ref[i]) <= 2e-4 for i, loss in losses), (losses, ref)
    assert abs(val_loss(proc.stdout) - val_loss(reference)) <= 2e-4
    assert "ZeRO-0 -> ZeRO-1: shards more over 2 ranks; redoing the iteration with a rebuilt engine" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert [(h["from"]["zero_stage"], h["to"]["zero_stage"], h["engine_rebuilt"]) for h in plan["history"]] == \
        [(0, 1, True), (1, 2, True), (2, 3, True)]
    info = json.loads(next((out / "checkpoints").glob("iter*/info.json")).read_text())
    assert plan["zero_stage"] == info["zero_stage"] == 3  # the checkpoint says what it holds, for resume


def test_nothing_left_to_give_up_is_one_error_line(tmp_path):
    """Every plan key fixed: no step-down exists, and the run stops with one line (a UserError: exit code 2)."""
    from trainer.config import Config
    from trainer.errors import UserError
    from trainer.model.shapes import Shape
    from trainer.plan.hardware import Hardware
    from trainer.plan.planner import PlanInput, make_plan
    from trainer.run.oom import Recovery
    from trainer.run.setup import Run

    cfg = Config(batch_size=12, gradient_accumulation_steps=1, block_size=64, n_layer=4, n_head=4, n_embd=128,
                 mode="full", zero_stage=0, offload="none", gradient_checkpointing=True, micro_batch_size=12,
                 dtype="auto", optimizer="adamw", grad_accum_dtype="fp32", activation_offload=False)
    shape = Shape(4, 4, 128, 128, 64)
    plan_input = PlanInput.of(cfg, shape)
    hw = Hardware("cpu", 8 * 2**30, 1, False, "CPU")
    run = Run(cfg=cfg, out_dir=tmp_path, rank=0, world=1, data=None, shape=shape, plan_input=plan_input, hw=hw,
              plan=make_plan(plan_input, hw), engine=None, ds_config={}, sampler=None, log=None,
              n_params=0, iter_num=7)
    recovery = Recovery(run)
    with pytest.raises(UserError) as info:
        recovery.step_down(("CUDA out of memory. Tried to allocate 2.00 GiB", False))
    assert str(info.value) == ("out of memory at iteration 7 (CUDA out of memory. Tried to allocate 2.00 GiB) and "
                               "the plan has nothing left to give up within the keys you fixed; last checkpoint: "
                               "none; set fixed plan keys back to auto, use more GPUs, or a smaller block_size")
    run.plan = make_plan(plan_input.with_keys(micro_batch_size="auto"), hw)
    with pytest.raises(UserError, match="inside the optimizer step, so the update may be half applied"):
        recovery.step_down(("CUDA out of memory.", True))


def test_an_error_inside_the_optimizer_step_is_recognised():
    """An update that may be half applied cannot be redone: describe() tells the two cases apart."""
    import torch

    from trainer.run.oom import describe

    def _take_model_step():  # the name DeepSpeed's engine steps the optimizer under
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def forward():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB\nmore")

    for fn, in_step in ((_take_model_step, True), (forward, False)):
        try:
            fn()
        except torch.OutOfMemoryError as exc:
            message, seen = describe(exc)
        assert seen is in_step and message.startswith("CUDA out of memory. Tried to allocate") and "\n" not in message
