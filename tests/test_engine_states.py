"""The planner's model-state bytes against the tensors a real DeepSpeed engine holds (CPU, fp32).

For full and LoRA modes, ZeRO 0-3, one and two ranks, torch's AdamW and bitsandbytes' 8-bit AdamW: weights,
gradients and optimizer states per rank as trainer/plan/memory.py predicts them (plan.estimate.states)
against the bytes of the storages the engine holds, counted by tests/engine_states.py (one process per rank
count, every configuration in it). Measured on the CI machine: every item within 2.1% (ZeRO-2 pads its
gradient partitions), the three together within 0.4%; 8-bit optimizer states byte for byte.
"""
import json

import pytest

from conftest import REPO, deepspeed_cmd, python, run_cmd

pytestmark = pytest.mark.slow  # launches training runs

TOLERANCE = 0.05
ITEMS = ("weights", "gradients", "optimizer_states")
CONFIGS = {(mode, zero, "adamw") for mode in ("full", "lora") for zero in (0, 1, 2, 3)} | {
    ("full", 0, "adamw8bit"), ("full", 2, "adamw8bit"), ("full", 3, "adamw8bit"), ("lora", 0, "adamw8bit"),
    ("full", 0, "adam_mini")}


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def records(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("states") / "states.json"
    script = REPO / "tests/engine_states.py"
    if request.param == 1:
        run_cmd(python(script, out), cwd=REPO)
    else:
        run_cmd(deepspeed_cmd(script, out, num_gpus=2), cwd=REPO)
    return request.param, json.loads(out.read_text())


def test_model_states_match_the_engine_within_5_percent(records):
    ranks, rows = records
    assert {(r["mode"], r["zero_stage"], r["optimizer"]) for r in rows} == CONFIGS and {r["ranks"] for r in rows} == {ranks}
    for r in rows:
        predicted, measured = r["predicted"], r["measured"]
        where = (f"{r['mode']} ZeRO-{r['zero_stage']} {r['optimizer']} on {ranks} rank(s): predicted {predicted}, "
                 f"measured {measured}")
        for item in ITEMS:
            assert abs(predicted[item] - measured[item]) <= TOLERANCE * measured[item], where
        total_p, total_m = sum(predicted[i] for i in ITEMS), sum(measured[i] for i in ITEMS)
        assert abs(total_p - total_m) <= TOLERANCE * total_m, where


def test_8bit_optimizer_states_are_counted_byte_for_byte(records):
    """bitsandbytes' 8-bit states: one byte per element per moment, an fp32 absmax per 256, 32-bit states for
    tensors under 4096 elements, the shared code books (trainer/optim/optimizer.state_bytes), and the fp32
    masters of ZeRO's partitions: exactly what the engine holds."""
    ranks, rows = records
    eight = [r for r in rows if r["optimizer"] == "adamw8bit"]
    for r in eight:
        assert r["predicted"]["optimizer_states"] == r["measured"]["optimizer_states"], r
        thirty_two = next(x for x in rows if (x["mode"], x["zero_stage"], x["optimizer"]) ==
                          (r["mode"], r["zero_stage"], "adamw"))
        assert r["measured"]["optimizer_states"] < 0.7 * thirty_two["measured"]["optimizer_states"]


def test_adam_mini_states_are_counted_byte_for_byte(records):
    """Adam-mini on the fp32 weights (the plain path, one and two ranks): the first moment per element, the
    second per row, per tensor or (biases) per element, by name (trainer/optim/optimizer.adam_mini_state_bytes):
    exactly the engine's; against AdamW's two moments about half."""
    ranks, rows = records
    mini = next(r for r in rows if r["optimizer"] == "adam_mini")
    adamw = next(r for r in rows if (r["mode"], r["zero_stage"], r["optimizer"]) == ("full", 0, "adamw"))
    assert mini["predicted"]["optimizer_states"] == mini["measured"]["optimizer_states"], mini
    assert 0.5 < mini["measured"]["optimizer_states"] / adamw["measured"]["optimizer_states"] < 0.52, (mini, adamw)


def test_sharding_shows_in_the_engine(records):
    """The engine really shards: two ranks hold less than one, stage by stage, as predicted."""
    ranks, rows = records
    full = {r["zero_stage"]: r["measured"] for r in rows if r["mode"] == "full" and r["optimizer"] == "adamw"}
    if ranks == 2:
        assert full[1]["optimizer_states"] < 0.8 * full[0]["optimizer_states"]
        assert full[2]["gradients"] < 0.6 * full[1]["gradients"]
        assert full[3]["weights"] < 0.6 * full[2]["weights"]
    lora = {r["zero_stage"]: r for r in rows if r["mode"] == "lora" and r["optimizer"] == "adamw"}
    assert lora[0]["params_trainable"] < 0.05 * lora[0]["params_total"]
    assert lora[0]["measured"]["optimizer_states"] < 0.1 * full[0]["optimizer_states"]


@pytest.fixture(scope="module")
def bf16_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("states") / "bf16.json"
    run_cmd(python(REPO / "tests/engine_states.py", out, "bf16"), cwd=REPO)
    return {(r["master_weights"], r["optimizer"]): r for r in json.loads(out.read_text())}


def test_bf16_weights_without_masters_are_counted_byte_for_byte(bf16_records):
    """master_weights: the bf16 weights stepped by a client optimizer on a real ZeRO-0 engine (CPU, bf16): the
    weights, the client optimizer's states (optimi's two moments and Kahan compensation, torchao's and torch's
    two moments and their step counters, torchao's 4-bit codes, block scales and maps) exactly as
    trainer/plan/memory.py counts them, the bf16 gradients to a few bytes (small flags); against fp32 masters
    (BF16_Optimizer) the states shrink as counted."""
    assert set(bf16_records) == {("fp32", "adamw"), ("bf16_kahan", "adamw"), ("bf16_sr", "adamw"), ("bf16", "adamw"),
                                 ("bf16_sr", "adamw4bit"), ("bf16", "adam_mini")}
    for (masters, _), r in bf16_records.items():
        predicted, measured = r["predicted"], r["measured"]
        assert r["dtype"] == "bf16", r
        assert predicted["weights"] == measured["weights"], r
        assert abs(predicted["gradients"] - measured["gradients"]) <= 64, r
        if masters != "fp32":  # (BF16_Optimizer's: within 5% above, its group flags and scalars)
            assert predicted["optimizer_states"] == measured["optimizer_states"], r
    fp32, kahan = bf16_records["fp32", "adamw"]["measured"], bf16_records["bf16_kahan", "adamw"]["measured"]
    four = bf16_records["bf16_sr", "adamw4bit"]["measured"]
    params = bf16_records["fp32", "adamw"]["params_trainable"]
    # 2 + 4 + 4 + 8 bytes per parameter with fp32 masters, 2 + 2 + 6 with Kahan's compensation
    assert sum(fp32[i] for i in ITEMS) == pytest.approx(18 * params, rel=1e-3)
    assert sum(kahan[i] for i in ITEMS) == pytest.approx(10 * params, rel=1e-3)
    assert four["optimizer_states"] < 0.3 * bf16_records["bf16_sr", "adamw"]["measured"]["optimizer_states"]
