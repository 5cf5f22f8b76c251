"""bf16 weights without fp32 masters (the `master_weights` key, the bf16_weights path of trainer/plan/memory.py).

The byte count on a real engine is tests/test_engine_states.py's (test_bf16_weights_without_masters_are_counted_
byte_for_byte); the quality is bench/master_weights_quality.py's. Here: the plan's arithmetic, what `auto` does,
the refusals, and a real run that trains, checkpoints and resumes on that path.
"""
import json
import re

import pytest

from conftest import REPO, python, run_cmd, train_args
from trainer.config import Config
from trainer.model.shapes import GPT2_SHAPES, Shape
from trainer.plan.hardware import detect_hardware
from trainer.plan.planner import PlanError, PlanInput, make_plan

XL = Shape(*GPT2_SHAPES["gpt2-xl"], 50257, 1024)


def xl_plan(gb, **keys):
    cfg = Config(**{"batch_size": 1, "gradient_accumulation_steps": 8, "block_size": 1024, "mode": "full", **keys})
    return make_plan(PlanInput.of(cfg, XL), detect_hardware(1, vram_gb=gb, gpus=1))


def test_model_states_per_parameter():
    """gpt2-xl, full, bf16 on one GPU: fp32 masters cost 2 (weights) + 4 (BF16_Optimizer's fp32 gradient buffer)
    + 4 (masters) + 8 (32-bit moments) bytes per parameter; bf16 weights with Kahan summation 2 + 2 (bf16
    gradients) + 6 (two bf16 moments, the compensation); with stochastic rounding or plain, 2 + 2 + 4."""
    per_param = {}
    for masters in ("fp32", "bf16_kahan", "bf16_sr", "bf16"):
        plan = xl_plan(80, master_weights=masters, optimizer="adamw")
        states = plan.estimate.states
        per_param[masters] = sum(states.values()) / plan.estimate.params_trainable
        assert plan.master_weights == masters and plan.zero_stage == 0 and plan.offload == "none"
        assert plan.grad_accum_dtype == ("fp32" if masters == "fp32" else "bf16")
    assert per_param["fp32"] == pytest.approx(18, abs=1e-3)
    assert per_param["bf16_kahan"] == pytest.approx(10, abs=1e-3)
    assert per_param["bf16_sr"] == pytest.approx(8, abs=1e-3) and per_param["bf16"] == pytest.approx(8, abs=1e-3)
    # torchao's 4-bit moments with stochastic rounding: 2 + 2 + 1.06 (two 4-bit codes, an fp32 scale per 128),
    # but the tied embedding's 50257 x 1600 elements are no multiple of 128: torchao keeps its moments bf16
    four = xl_plan(80, master_weights="bf16_sr", optimizer="adamw4bit")
    assert four.optimizer == "adamw4bit"
    wte = 50257 * 1600
    expected = 4 + (1.0625 * (four.estimate.params_trainable - wte) + 4 * wte) / four.estimate.params_trainable
    assert sum(four.estimate.states.values()) / four.estimate.params_trainable == pytest.approx(expected, abs=2e-3)
    assert expected == pytest.approx(5.215, abs=1e-3)


def test_auto_takes_the_compensated_tools_the_quality_table_admits_and_a_fixed_setting_is_named():
    """The quality table admits bf16_kahan and bf16_sr (docs/plan.md's paired rule), never plain bf16: at 24 GB
    gpt2-xl with fp32 masters needs recomputation and 8-bit states (1.37x), without them it needs neither; at
    80 GB fp32 masters fit as fast and stay (equal times go to fewer tools). The plan names the setting and why
    in text and JSON."""
    auto = xl_plan(24)
    assert auto.master_weights in ("bf16_kahan", "bf16_sr") and not auto.gradient_checkpointing
    assert auto.optimizer == "adamw" and auto.step_time < 1.37
    assert "quality table" in auto.reasons["master_weights"]
    assert xl_plan(80).master_weights == "fp32"
    assert all(r["master_weights"] != "bf16" for r in auto.runners_up)
    kahan = xl_plan(24, master_weights="bf16_kahan")
    assert kahan.reasons["master_weights"].startswith("bf16_kahan: fixed by the user; no fp32 copy")
    proc = run_cmd(python("launch/train.py", "--recipe", "gpt2_xl", "--plan", "--json", "--vram_gb=24",
                          "--master_weights=bf16_kahan"), cwd=REPO)
    plan = json.loads(proc.stdout)
    assert plan["master_weights"] == "bf16_kahan" and plan["grad_accum_dtype"] == "bf16"
    assert "master_weights" in plan["reasons"]


@pytest.mark.parametrize("keys,message", [
    ({"dtype": "fp32"}, r"^master_weights=bf16_kahan updates bf16 weights without an fp32 copy, but dtype=fp32; "
                        r"set --dtype=bf16"),
    ({"dtype": "fp16"}, r"but dtype=fp16; set --dtype=bf16"),
    ({"mode": "lora"}, r"is for full finetuning .* but mode=lora; set --mode=full"),
    ({"zero_stage": 2}, r"runs at ZeRO-0 without offload .* set --zero_stage=0 --offload=none"),
    ({"optimizer": "adamw8bit"}, r"steps its own AdamW on the bf16 weights, not optimizer=adamw8bit"),
    ({"grad_accum_dtype": "fp32"}, r"accumulates gradients in the bf16 weights' own .grad"),
    ({"optimizer": "adamw4bit"}, r"^optimizer=adamw4bit is torchao's AdamW4bit, which this trainer runs on bf16 "
                                 r"weights with stochastic rounding .* but master_weights=bf16_kahan; set "
                                 r"--master_weights=bf16_sr --dtype=bf16$"),
    ({"optimizer": "adamw4bit", "master_weights": "fp32"}, r"but master_weights=fp32; set --master_weights=bf16_sr"),
])
def test_settings_it_cannot_keep_are_one_line(keys, message):
    with pytest.raises(PlanError, match=message) as info:
        xl_plan(80, **{"master_weights": "bf16_kahan", "dtype": "bf16", **keys})
    assert "\n" not in str(info.value)


def test_fp32_training_with_compensated_bf16_exits_2_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out, "--dtype=fp32", "--master_weights=bf16_sr")), cwd=REPO,
                   check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(
        "error: master_weights=bf16_sr updates bf16 weights without an fp32 copy, but dtype=fp32; set --dtype=bf16"), \
        proc.stderr
    assert not out.exists()


ITERS = 6
RUN = [f"--max_iters={ITERS}", f"--eval_interval={ITERS // 2}", "--eval_iters=2", "--log_interval=1",
       "--warmup_iters=2", "--dtype=bf16", "--always_save_checkpoint=True"]


def losses(stdout):
    return [(int(i), float(v)) for i, v in re.findall(rf"iter (\d+)/{ITERS}: loss ([\d.]+)", stdout)]


@pytest.mark.slow
@pytest.mark.parametrize("masters,optimizer", [("bf16_kahan", "adamw"), ("bf16_sr", "adamw"), ("bf16_sr", "adamw4bit")])
def test_a_run_trains_checkpoints_and_resumes_on_bf16_weights(data_dir, tmp_path, masters, optimizer):
    """The real path: DeepSpeed ZeRO-0 with no precision section, the client optimizer on the bf16 module. The loss
    falls; the checkpoint says what it holds; a resume from the middle logs the uninterrupted run's losses
    (the optimizer's states, Kahan's compensation and torchao's 4-bit codes included, come back); another setting is refused."""
    out = tmp_path / "out"
    keys = [f"--master_weights={masters}", f"--optimizer={optimizer}"]
    full = run_cmd(python(*train_args(data_dir, out, *RUN, *keys)), cwd=REPO).stdout
    ran = losses(full)
    assert [i for i, _ in ran] == list(range(1, ITERS + 1)) and ran[-1][1] < ran[0][1] - 0.3, ran
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["master_weights"], plan["optimizer"], plan["dtype"], plan["zero_stage"]) == \
        (masters, optimizer, "bf16", 0)
    info = json.loads((out / "checkpoints" / "iter0000003" / "info.json").read_text())
    assert (info["master_weights"], info["engine_zero_stage"]) == (masters, 0)

    half = tmp_path / "half"
    run_cmd(python(*train_args(data_dir, half, *RUN, *keys, f"--max_iters={ITERS // 2}")), cwd=REPO)
    resumed = run_cmd(python(*train_args(data_dir, half, *RUN, "--init_from=resume")), cwd=REPO).stdout
    assert losses(resumed) == ran[ITERS // 2:], (losses(resumed), ran)
    if optimizer != "adamw":
        return
    other = "bf16_kahan" if masters == "bf16_sr" else "bf16_sr"
    proc = run_cmd(python(*train_args(data_dir, half, *RUN, "--init_from=resume", f"--master_weights={other}")),
                   cwd=REPO, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: the checkpoint holds master_weights={masters} (its optimizer states are of that kind), not "
        f"{other}; resume with --master_weights={masters}")
