"""optimizer=adam_mini: Adam-mini's factored second moments (trainer/optim/optimizer.py), on the model's own tensors.

The byte count on a real engine is tests/test_engine_states.py's (test_adam_mini_states_are_counted_byte_for_byte,
and the bf16 weights' test); the simulated step is tests/test_simulate.py's; its quality row is
bench/optimizer_parity.py's (bench/RESULTS.md). Here: the plan's arithmetic, the refusals, Adam-mini's blocks on
the real model, and a real run that trains, checkpoints and resumes exactly.
"""
import json

import pytest

from conftest import REPO, fails_cleanly, python, run_cmd, train_args
from test_master_weights import ITERS, RUN as MASTER_RUN, losses, xl_plan
from test_multirank import TOLERANCE, launch
from trainer.config import Config
from trainer.model.shapes import gpt2_named_shapes
from trainer.optim.optimizer import adam_mini_block
from trainer.plan.planner import PlanError


def test_model_states_per_parameter():
    """gpt2-xl on bf16 weights: 2 (weights) + 2 (bf16 gradients) + 2 (the first moment) bytes per parameter and
    a second moment per row (about 0.1%); in fp32 training 4 + 4 + 4; against AdamW's two moments on the same
    weights, 2 bytes per parameter fewer (bf16), 4 fewer (fp32)."""
    for dtype, keys, per_param, adamw in (("bf16", {"master_weights": "bf16"}, 6, 8),
                                           ("fp32", {}, 12, 16)):
        mini = xl_plan(80, dtype=dtype, optimizer="adam_mini", **keys)
        assert (mini.optimizer, mini.zero_stage, mini.offload, mini.mode) == ("adam_mini", 0, "none", "full")
        states = mini.estimate.states
        assert sum(states.values()) / mini.estimate.params_trainable == pytest.approx(per_param, rel=2e-3)
        other = xl_plan(80, dtype=dtype, optimizer="adamw", **keys)
        assert sum(other.estimate.states.values()) / other.estimate.params_trainable == \
            pytest.approx(adamw, rel=1e-3)
        assert mini.reasons["optimizer"] == "fixed by the user"


def test_blocks_of_gpt2_follow_adam_mini_own_rules():
    """The names the count classifies are the real model's (its wrapper's prefix included), and Adam-mini's own
    step gives each the second moment the count says: per row for the embeddings and projections, per tensor
    for the LayerNorms' weights, per element for the biases."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.optim.optimizer import adam_mini_optimizer
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=32))
    named = dict(model.named_parameters())
    assert [(n, tuple(p.shape)) for n, p in named.items()] == \
        [(n, s) for n, s in gpt2_named_shapes(1, 8, 32, 16)]
    cfg = Config(learning_rate=1e-3)
    opt = adam_mini_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for name, p in named.items():
        state = opt.state[p]
        second = state["v"] if "v" in state else state["vmean"]
        expected = {"elements": p.numel(), "rows": p.shape[0], "tensor": 1}[adam_mini_block(name)]
        assert second.numel() == expected, (name, {k: getattr(v, "shape", v) for k, v in state.items()})
    assert {adam_mini_block(n) for n in named} == {"elements", "rows", "tensor"}


@pytest.mark.parametrize("keys,message", [
    ({"mode": "lora"}, r"^optimizer=adam_mini factors the second moments of the model's own matrices, a "
                       r"full-finetuning tool, but mode=lora; set --mode=full or --optimizer=auto$"),
    ({"zero_stage": 2}, r"^optimizer=adam_mini steps whole tensors at ZeRO-0 without offload .* but zero_stage=2, "
                        r"offload=none; set --zero_stage=0 --offload=none \(or auto\)$"),
    ({"dtype": "bf16"}, r"^optimizer=adam_mini steps the weights themselves .* but dtype=bf16 with master_weights="
                        r"auto; set --dtype=fp32, or --dtype=bf16 --master_weights=bf16 "),
    ({"dtype": "fp16"}, r"but dtype=fp16 with master_weights=auto; set --dtype=fp32"),
    ({"dtype": "bf16", "master_weights": "bf16_kahan"}, r"but dtype=bf16 with master_weights=bf16_kahan; set "),
])
def test_settings_it_cannot_keep_are_one_line(keys, message):
    with pytest.raises(PlanError, match=message) as info:
        xl_plan(80, **{"optimizer": "adam_mini", **keys})
    assert "\n" not in str(info.value)


def test_a_refused_launch_exits_2_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    fails_cleanly(train_args(data_dir, out, "--optimizer=adam_mini", "--mode=lora"),
                  "optimizer=adam_mini factors the second moments of the model's own matrices")
    assert not out.exists()


# test_master_weights.py's short run, with Adam-mini, each dtype as the test's parameter says
RUN = [w for w in MASTER_RUN if not w.startswith("--dtype=")] + ["--optimizer=adam_mini"]


@pytest.mark.slow
@pytest.mark.parametrize("keys", [["--dtype=fp32"], ["--dtype=bf16", "--master_weights=bf16"]],
                         ids=["fp32", "bf16_weights"])
def test_a_run_trains_and_the_fp32_one_resumes_exactly(data_dir, tmp_path, keys):
    """The real engine (DeepSpeed ZeRO-0, Adam-mini as its client optimizer on the module's tensors): the loss
    falls and the plan says what ran. In fp32 a resume from the middle logs the uninterrupted run's losses
    (Adam-mini's moments and step counts come back from a checkpoint read without running code); on bf16 weights
    the checkpoint is DeepSpeed's same ZeRO-0 client-optimizer file, whose resume test_master_weights.py runs."""
    out = tmp_path / "out"
    full = run_cmd(python(*train_args(data_dir, out, *RUN, *keys)), cwd=REPO).stdout
    ran = losses(full)
    assert [i for i, _ in ran] == list(range(1, ITERS + 1)) and ran[-1][1] < ran[0][1] - 0.3, ran
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["optimizer"], plan["zero_stage"], plan["mode"], plan["dtype"]) == \
        ("adam_mini", 0, "full", keys[0].split("=")[1])
    if keys != ["--dtype=fp32"]:
        return
    half = tmp_path / "half"
    run_cmd(python(*train_args(data_dir, half, *RUN, *keys, f"--max_iters={ITERS // 2}")), cwd=REPO)
    resumed = run_cmd(python(*train_args(data_dir, half, *RUN, "--init_from=resume")), cwd=REPO).stdout
    assert losses(resumed) == ran[ITERS // 2:], (losses(resumed), ran)


@pytest.mark.slow
def test_two_ranks_step_as_one_rank(data_dir, tmp_path):
    """ZeRO-0 on two CPU ranks (fp32): each rank steps its whole tensors with the averaged gradient, Adam-mini's
    own cross-rank sums off (trainer/optim/optimizer.adam_mini_optimizer): the val loss is one rank's within
    test_multirank.py's tolerance, the order of the floating-point reductions aside."""
    one = launch(data_dir, tmp_path / "r1", 1, 0, "--optimizer=adam_mini")[0]
    two, stdout = launch(data_dir, tmp_path / "r2", 2, 0, "--optimizer=adam_mini")
    assert "x 2 ranks" in stdout and one[30] < one[0] - 0.8, (one, stdout[-2000:])
    assert abs(two[30] - one[30]) < TOLERANCE, (two, one)
