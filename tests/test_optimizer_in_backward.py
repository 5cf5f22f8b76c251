"""The optimizer step inside the backward (optimizer_in_backward, trainer/optim/release.py): torch-optimi's
gradient release on bf16_kahan weights, and the hooks stepping torchao's optimizers (bf16_sr, adamw4bit), torch's
or Adam-mini (bf16) one tensor at a time; one rank, no accumulation.

On real CPU engines (tests/optimizer_in_backward.py), for each: the update equals the ordinary step tensor for
tensor (grad_clip 0; with stochastic rounding within a rounding step), per-tensor clipping equals the ordinary step with each gradient clipped on its own (and differs
from the global clip), no gradient is left after the backward and the engine's bytes are the plan's, a
non-finite gradient behind a finite loss raises before its tensor is stepped. Here besides: the plan's
arithmetic, the refusals, and real runs: training, the injection hook (a non-finite loss: the step skipped whole)
and a real divergence (the guard's line, the last good checkpoint kept).
"""
import json
import re

import pytest

from conftest import REPO, copy_run, fails_cleanly, python, run_cmd, tb_scalars, train_args
from test_master_weights import xl_plan
from trainer.config import Config
from trainer.model.shapes import GPT2_SHAPES, Shape
from trainer.plan.hardware import detect_hardware
from trainer.plan.planner import PlanError, PlanInput, make_plan
from trainer.run import checkpoint

KAHAN = {"master_weights": "bf16_kahan", "batch_size": 1, "gradient_accumulation_steps": 1,
         "gradient_checkpointing": True}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "release.json"
    run_cmd(python(REPO / "tests/optimizer_in_backward.py", out), cwd=REPO)
    return json.loads(out.read_text())


ALL_TOOLS = ("bf16_kahan+adamw", "bf16+adamw", "bf16_sr+adamw4bit", "bf16+adam_mini")
STATEFUL = ("bf16_kahan+adamw", "bf16_sr+adamw4bit")  # measured for bytes and the non-finite check


@pytest.mark.parametrize("tools", ALL_TOOLS)
def test_one_micro_step_is_the_ordinary_step_tensor_for_tensor(engines, tools):
    exact = engines[tools]["exact"]
    assert exact["equal"] == [True, True], exact
    assert all(".ln_" in n for n in exact["unmoved"]) and (tools != "bf16_sr+adamw4bit" or not exact["unmoved"]), exact
    assert all(n > 0 for n in exact["norms"])  # the global norm of the iteration, summed from the tensors'


@pytest.mark.parametrize("tools", ["bf16_kahan+adamw", "bf16+adamw", "bf16+adam_mini"])
def test_clipping_is_per_tensor(engines, tools):
    """grad_clip 1e-3 (every tensor clipped): the update is the ordinary step's with each gradient clipped to
    the limit on its own, not the global clip's."""
    per_tensor = engines[tools]["per_tensor"]
    assert per_tensor["equal"] == [True, True] and per_tensor["equal_to_global_clip"] is False, per_tensor


@pytest.mark.parametrize("tools", STATEFUL)
def test_no_gradient_is_held_and_the_bytes_are_the_estimate(engines, tools):
    b = engines[tools]["bytes"]
    assert b["held_grads"] == 0 and b["predicted"]["gradients"] == 0, b
    assert b["measured"]["gradients"] <= 64, b  # (torchao keeps each group's lr a 4-byte tensor)
    assert b["measured"]["weights"] == b["predicted"]["weights"], b
    assert b["measured"]["optimizer_states"] == b["predicted"]["optimizer_states"], b


@pytest.mark.parametrize("tools", STATEFUL)
def test_a_non_finite_gradient_stops_before_its_tensor_is_stepped(engines, tools):
    nonfinite = engines[tools]["nonfinite"]
    assert nonfinite["raised"] == nonfinite["name"] and nonfinite["unstepped"], nonfinite
    assert nonfinite["stepped_before_it"]  # the tensors whose gradients came first are stepped: no skip possible


def test_the_plan_holds_no_gradient_only_the_largest_in_flight():
    """gpt2-xl at 24 GB: the step in the backward frees the 2 bytes per parameter of bf16 gradients; the largest
    tensor's gradient (the tied wte/lm_head, 50257 x 1600 bf16) joins the backward's peak instead."""
    kept, released = xl_plan(24, **KAHAN), xl_plan(24, **KAHAN, optimizer_in_backward=True)
    assert released.optimizer_in_backward and not kept.optimizer_in_backward
    assert kept.estimate.items["gradients"] == 2 * kept.estimate.params_trainable
    assert released.estimate.items["gradients"] == 0
    largest = 2 * 50257 * 1600
    assert released.estimate.items["optimizer_step_transient"] == kept.estimate.items["optimizer_step_transient"] \
        + largest
    m, step = kept.estimate.items, kept.estimate.items["optimizer_step_transient"]
    backward = m["activations"] + m["logits_and_loss"]  # the largest tensor steps last, after the activations
    assert kept.estimate.allocated - released.estimate.allocated == \
        2 * kept.estimate.params_trainable + max(backward, step) - max(backward, step + largest)
    assert released.estimate.total < kept.estimate.total - 2.5 * 2**30  # gpt2-xl: 2.9 GiB of gradients less
    assert all("step in the backward" in r["plan"] for r in released.runners_up)


def test_auto_keeps_the_ordinary_step_and_json_names_the_key():
    assert xl_plan(24, **KAHAN).optimizer_in_backward is False  # until its quality is measured (docs/plan.md)
    proc = run_cmd(python("launch/train.py", "--recipe", "gpt2_xl", "--plan", "--json", "--vram_gb=24",
                          "--master_weights=bf16_kahan", "--batch_size=1", "--gradient_accumulation_steps=1",
                          "--optimizer_in_backward=True"), cwd=REPO)
    plan = json.loads(proc.stdout)
    assert plan["optimizer_in_backward"] is True and plan["memory"]["gradients"] == 0
    assert plan["grad_accum_per_rank"] == 1 and plan["reasons"]["optimizer_in_backward"].startswith("on: fixed by")


XL = Shape(*GPT2_SHAPES["gpt2-xl"], 50257, 1024)


@pytest.mark.parametrize("keys,gpus,message", [
    ({"master_weights": "fp32"}, 1, r"^optimizer_in_backward=True steps the optimizer over the bf16 weights in the "
                                   r"backward \(DeepSpeed's fp32-master optimizers step only whole\), but "
                                   r"master_weights=fp32; set --master_weights=bf16_kahan \(or bf16_sr\) --dtype=bf16$"),
    ({"micro_batch_size": 2}, 1, r"^optimizer_in_backward=True updates the weights in every backward, so it cannot "
                                 r"accumulate gradients, but micro_batch_size=2 with 8 sequences per iteration "
                                 r"accumulates 4; set --micro_batch_size=8 \(or auto\) or --optimizer_in_backward"),
    ({}, 2, r"^optimizer_in_backward=True steps each tensor before ZeRO-0's all-reduce would average its gradient "
            r"over the 2 ranks; run on one rank or set --optimizer_in_backward=False$"),
    ({"zero_stage": 2}, 1, r"runs at ZeRO-0 without offload"),
    ({"mode": "lora"}, 1, r"is for full finetuning"),
])
def test_settings_it_cannot_keep_are_one_line(keys, gpus, message):
    cfg = Config(**{"batch_size": 8, "gradient_accumulation_steps": 1, "block_size": 1024,
                    "master_weights": "bf16_kahan", "optimizer_in_backward": True, **keys})
    with pytest.raises(PlanError, match=message):
        make_plan(PlanInput.of(cfg, XL), detect_hardware(gpus, vram_gb=80, gpus=gpus))


def test_auto_steps_in_the_backward_only_where_the_ordinary_step_does_not_fit():
    """gpt2-xl, 8 sequences per iteration: at 10 GB only the step in the backward over torchao's 4-bit AdamW fits
    full finetuning (no gradient held), so auto takes it with bf16_sr and the whole iteration in one micro-batch;
    with 32-bit states (optimizer=adamw) at 16 GB it takes it with bf16_kahan; at 16 GB with the optimizer on auto
    the ordinary 4-bit step fits and it stays off (its host sync per tensor costs time); with several GPUs
    never."""
    def plan(gb, gpus=1, **keys):
        cfg = Config(**{"batch_size": 1, "gradient_accumulation_steps": 8, "block_size": 1024, **keys})
        return make_plan(PlanInput.of(cfg, XL), detect_hardware(gpus, vram_gb=gb, gpus=gpus))
    tight = plan(10)
    assert tight.mode == "full" and tight.optimizer_in_backward
    assert (tight.master_weights, tight.optimizer) == ("bf16_sr", "adamw4bit")
    assert tight.micro_batch_size == 8 and tight.grad_accum_per_rank == 1
    assert tight.reasons["optimizer_in_backward"].startswith("on: with the ordinary step the plan needs")
    assert tight.estimate.items["gradients"] == 0
    kahan = plan(16, optimizer="adamw")
    assert kahan.optimizer_in_backward and kahan.master_weights == "bf16_kahan" and kahan.micro_batch_size == 8
    assert not plan(16).optimizer_in_backward and plan(16).optimizer == "adamw4bit"
    assert not plan(24).optimizer_in_backward
    assert plan(10, gpus=2).mode != "full" or not plan(10, gpus=2).optimizer_in_backward
    fixed = plan(80, optimizer_in_backward=True, optimizer="adamw")  # master_weights on auto: one it runs on
    assert fixed.master_weights in ("bf16_kahan", "bf16_sr") and fixed.optimizer_in_backward


def test_a_setting_it_cannot_keep_exits_2_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    fails_cleanly(train_args(data_dir, out, "--dtype=bf16", "--master_weights=fp32",
                             "--optimizer_in_backward=True"),
                  "optimizer_in_backward=True steps the optimizer over the bf16 weights in the backward")
    assert not out.exists()


SMALL = ("--n_layer=1", "--n_head=2", "--n_embd=32", "--eval_iters=1", "--log_interval=1", "--dtype=bf16",
         "--master_weights=bf16_kahan", "--optimizer_in_backward=True")


def losses(stdout):
    return [float(v) for v in re.findall(r"iter \d+/\d+: loss ([\d.]+)", stdout)]


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory):
    """A run with the step in the backward: its checkpoint at iteration 2."""
    out = tmp_path_factory.mktemp("released") / "run"
    stdout = run_cmd(python(*train_args(data_dir, out, "--max_iters=2", "--eval_interval=2", *SMALL)), REPO).stdout
    return out, stdout


@pytest.mark.slow
def test_a_run_trains_with_the_step_in_the_backward(good_run, data_dir, tmp_path):
    out, _ = good_run
    plan = json.loads((out / "plan.json").read_text())
    assert plan["optimizer_in_backward"] is True and plan["grad_accum_per_rank"] == 1
    more = copy_run(out, tmp_path)
    stdout = run_cmd(python(*train_args(data_dir, more, "--init_from=resume", "--max_iters=8", "--eval_interval=4",
                                        *SMALL)), REPO).stdout
    ran = losses(stdout)
    assert len(ran) == 6 and ran[-1] < ran[0], stdout[-2000:]
    norms = tb_scalars(more, "train/grad_norm")  # the global norm, summed from the tensors' in the hooks
    assert set(range(3, 9)) <= set(norms) and all(0 < norms[i] < 1e3 for i in range(3, 9)), norms


@pytest.mark.slow
def test_a_non_finite_loss_skips_the_step_whole(good_run, data_dir, tmp_path):
    """GPT2DS_INJECT_NAN=3: iteration 3's loss is NaN; its backward (which would step the weights) is not run, the
    guard counts a skipped step and the run goes on."""
    out = copy_run(good_run[0], tmp_path)
    proc = run_cmd(python(*train_args(data_dir, out, "--init_from=resume", "--max_iters=5", "--eval_interval=5",
                                      *SMALL)), REPO, env={"GPT2DS_INJECT_NAN": "3"})
    assert "iter 4: non-finite loss or gradient norm, step skipped (1 in a row, 1 in all)" in proc.stdout, \
        proc.stdout[-2000:]
    assert checkpoint.latest_tag(out) == "iter0000005"


@pytest.mark.slow
def test_a_real_divergence_stops_with_the_guards_line(good_run, data_dir, tmp_path):
    """learning_rate 1e20: iteration 3's steps in the backward blow the weights up; iteration 4's loss is non-finite
    (its backward not run: skipped), its evaluation stops the run with the guard's line, the last good checkpoint
    kept."""
    out = copy_run(good_run[0], tmp_path)
    line = fails_cleanly(train_args(data_dir, out, "--init_from=resume", "--learning_rate=1e20", "--warmup_iters=0",
                                    "--max_iters=8", "--eval_interval=2", "--always_save_checkpoint=True", *SMALL),
                         "at iteration 4, found at its evaluation: the run diverged; stopped without saving (last "
                         "good checkpoint: iter0000002)")
    assert checkpoint.latest_tag(out) == "iter0000002", line


@pytest.mark.parametrize("checkpointing,tools", [(False, "bf16_kahan+adamw"), (True, "bf16_kahan+adamw"),
                                                (True, "bf16_sr+adamw4bit"), (False, "bf16+adam_mini")])
def test_simulated_on_fake_tensors(checkpointing, tools):
    """--plan --simulate's step (the hooks of trainer/optim/release.step_in_backward on fake tensors, after a first
    backward that creates the states; torchao's step eagerly): no gradient left, the states and weights exactly, the backward's peak (the wte/lm_head
    stepped last, its gradient whole) within 1% of the estimate, with recomputation within 3% (the states are
    known to the tracker before the hooks update them in place: without that they were counted again as the
    hooks touched them: 4.7% over here, 9.4 against 0.95 GiB for gpt2-xl's 16 GB plan); nothing left for
    engine.step()."""
    from tests.test_simulate import plan_for
    from trainer.plan.simulate import comparison, simulate
    masters, optimizer = tools.split("+")
    cfg, shape, plan = plan_for(mode="full", gradient_checkpointing=checkpointing, dtype="bf16",
                                master_weights=masters, optimizer=optimizer, optimizer_in_backward=True, batch_size=2,
                                gradient_accumulation_steps=1, micro_batch_size=2)
    rows = {r["item"]: r for r in comparison(plan, simulate(cfg, shape, plan))}
    assert rows["gradients"]["estimated"] == rows["gradients"]["simulated"] == 0, rows
    for item in ("weights", "optimizer_states"):
        assert abs(rows[item]["difference"]) <= 0.001, rows[item]
    assert abs(rows["activations_and_logits"]["difference"]) <= (0.03 if checkpointing else 0.01), rows
    # (Adam-mini's step() squares a LayerNorm weight with no gradient, one at a time: 1.5 KiB here)
    assert rows["optimizer_step_transient"]["simulated"] < 4096, rows


@pytest.mark.slow
def test_a_resume_with_the_other_setting_and_an_out_of_memory_error_are_one_line(good_run, data_dir, tmp_path):
    """optimi counts steps per tensor with the step in the backward and per group without: a resume with the other
    setting is refused. An out-of-memory error (GPT2DS_INJECT_OOM) is not stepped down: the iteration's step may
    be partly applied, so the run stops with its line, the last good checkpoint kept."""
    out = copy_run(good_run[0], tmp_path)
    args = [a for a in SMALL if a != "--optimizer_in_backward=True"]
    fails_cleanly(train_args(data_dir, out, "--init_from=resume", "--max_iters=4", *args,
                             "--optimizer_in_backward=False"),
                  "the checkpoint holds optimizer_in_backward=True (its optimizer states are of that kind), not "
                  "False; resume with --optimizer_in_backward=True", watch=out)
    fails_cleanly(train_args(data_dir, out, "--init_from=resume", "--max_iters=4", *SMALL),
                  "out of memory with optimizer_in_backward=True (", env={"GPT2DS_INJECT_OOM": "3"})
    assert checkpoint.latest_tag(out) == "iter0000002"
