"""The planner's arithmetic against hand-computed cases, and its search and step-down rules."""
import json
import re
import time
from dataclasses import replace

import pytest

from trainer.model.shapes import GPT2_SHAPES, Shape, gpt2_param_count, lora_trainable_count, model_shape
from trainer.plan import memory as mm
from trainer.plan.hardware import Hardware, detect_hardware
from trainer.plan.memory import Candidate, estimate
from trainer.plan.planner import PlanError, PlanInput, make_plan, step_down
from trainer.plan.report import format_plan, plan_to_dict
from trainer.plan.search import Search
from trainer.units import GiB
from trainer.config import Config

ALL = ["c_attn", "c_proj", "c_fc"]
RECIPE_BATCH = {"gpt2": (8, 8), "gpt2-medium": (4, 8), "gpt2-large": (2, 8), "gpt2-xl": (1, 8)}


def cfg_for(model, **overrides):
    """The planner's input for a GPT-2 size with its recipe's batch, plan keys on auto unless given."""
    bs, ga = RECIPE_BATCH[model]
    cfg = Config(batch_size=bs, gradient_accumulation_steps=ga, block_size=1024, mode="auto", zero_stage="auto",
                 offload="auto", gradient_checkpointing="auto", micro_batch_size="auto", lora_r=8, lora_targets=ALL,
                 lora_dropout=0.0, dtype="auto", dropout=0.0, optimizer="auto", grad_accum_dtype="auto",
                 activation_offload="auto", master_weights="auto", optimizer_in_backward="auto", use_dora=False,
                 loraplus_lr_ratio=1.0)
    cfg = replace(cfg, **overrides)
    return PlanInput.of(cfg, shape_of(model))


def gpu(gb, n=1):
    return detect_hardware(n, vram_gb=gb, gpus=n)


def shape_of(model):
    return Shape(*GPT2_SHAPES[model], 50257, 1024)


def est(model, mode="full", zero=0, offload="none", ckpt=False, micro=1, dtype="bf16", n=1, device="cuda",
        lora_dropout=0.0):
    return estimate(shape_of(model), Candidate(mode, zero, offload, ckpt, micro), dtype, n, device, 70 * GiB,
                    lora_r=8, lora_targets=ALL, lora_dropout=lora_dropout)


# ----------------------------------------------------------------------------- counts

@pytest.mark.parametrize("model,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_true_parameter_counts(model, count):
    assert gpt2_param_count(*GPT2_SHAPES[model], 50257, 1024) == count


def test_param_count_small_shape_by_hand():
    # V*C + T*C + L*(12C^2 + 13C) + 2C with L=2, C=4, V=10, T=8: 40 + 32 + 2*244 + 8
    assert gpt2_param_count(2, 2, 4, 10, 8) == 568


def test_lora_trainable_count_by_hand():
    # gpt2, r=8: c_attn 8*(768+2304), attn c_proj 8*(768+768), mlp c_proj 8*(3072+768), c_fc 8*(768+3072)
    per_layer = 8 * 3072 + 8 * 1536 + 8 * 3840 + 8 * 3840
    assert lora_trainable_count(12, 768, 8, ALL) == 12 * per_layer == 1_179_648
    assert lora_trainable_count(12, 768, 8, ["c_attn"]) == 12 * 8 * 3072 == 294_912
    assert lora_trainable_count(12, 768, 16, ["c_proj"]) == 12 * 16 * (1536 + 3840)
    with pytest.raises(ValueError):
        lora_trainable_count(12, 768, 8, ["q_proj"])


def test_counts_match_transformers_and_peft():
    """The formulas against the real libraries on a tiny GPT-2."""
    import peft  # hard dependencies (requirements.txt): missing, this is a failure, not a skip
    import transformers
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) == gpt2_param_count(2, 2, 16, 50, 32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                      fan_in_fan_out=True, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == lora_trainable_count(2, 16, 4, ["c_attn", "c_fc"])


# ----------------------------------------------------------------------------- model states

def states(e):
    return e.items["weights"] + e.items["gradients"] + e.items["optimizer_states"]


def test_full_bf16_adamw_is_16_bytes_per_parameter():
    p = gpt2_param_count(*GPT2_SHAPES["gpt2-medium"], 50257, 1024)
    e = est("gpt2-medium", dtype="fp16")
    assert (e.items["weights"], e.items["gradients"], e.items["optimizer_states"]) == (2 * p, 2 * p, 12 * p)
    assert states(e) == 16 * p
    # bf16 at ZeRO-0 (BF16_Optimizer, docs/gpu.md) keeps a flat fp32 gradient buffer instead of the bf16
    # gradients, which immediate_grad_update frees as each is added into it: 18 bytes
    assert states(est("gpt2-medium")) == 18 * p


def test_zero_stages_divide_by_n():
    p, n = 124_439_808, 4
    z1, z2, z3 = (est("gpt2", zero=z, n=n) for z in (1, 2, 3))
    assert (z1.items["weights"], z1.items["gradients"], z1.items["optimizer_states"]) == (2 * p, 2 * p, 12 * p // n)
    assert (z2.items["weights"], z2.items["gradients"], z2.items["optimizer_states"]) == (2 * p, 2 * p // n,
                                                                                          12 * p // n)
    # ZeRO-3: a quarter of the weights, plus in flight the gathered wte, one prefetch bucket and what
    # recurs within stage3_max_reuse_distance (at gpt2's size: every partitioned tensor), plus biases and
    # LayerNorms (below the persistence threshold) whole on every rank
    small = 12 * 13 * 768 + 2 * 768
    in_flight = min(50257 * 768 + mm.BUCKET_ELEMENTS_SMALL + mm.STAGE3_MAX_REUSE_DISTANCE, p - small) * 2
    assert in_flight == (p - small) * 2
    assert z3.items["weights"] == 2 * p // n + in_flight + small * 2 == 311_099_520
    assert (z3.items["gradients"], z3.items["optimizer_states"]) == (2 * p // n, 12 * p // n)


def test_one_rank_zero_saves_nothing_on_model_states():
    # fp16: bf16 ZeRO-0 runs through BF16_Optimizer and its fp32 gradient buffer (docs/gpu.md)
    assert all(states(est("gpt2", zero=z, dtype="fp16")) >= states(est("gpt2", dtype="fp16")) for z in (1, 2, 3))


def test_offload_moves_states_off_the_gpu():
    p = 1_557_611_200
    none, opt = est("gpt2-xl", zero=2), est("gpt2-xl", zero=2, offload="optimizer")
    assert none.items["optimizer_states"] == 12 * p and none.host == 0
    assert opt.items["optimizer_states"] == 0 and opt.items["gradients"] == 0
    assert opt.items["optimizer_step_transient"] == 0
    assert opt.host == (12 + 4 + 2) * p  # Adam moments + master, fp32 grads, 16-bit staging
    params = est("gpt2-xl", zero=3, offload="optimizer+params")
    assert params.items["weights"] < 0.2 * 2 * p  # only modules in flight
    assert params.host == opt.host + 2 * p


def test_fp32_on_cpu():
    p = 124_439_808
    z0 = est("gpt2", dtype="fp32", device="cpu")
    assert (z0.items["weights"], z0.items["gradients"], z0.items["optimizer_states"]) == (4 * p, 4 * p, 8 * p)
    # ZeRO>=1 clones an fp32 partition even when training in fp32
    assert est("gpt2", zero=1, n=2, dtype="fp32", device="cpu").items["optimizer_states"] == 12 * p // 2


def test_lora_and_qlora_weights():
    p = 124_439_808
    t = lora_trainable_count(12, 768, 8, ALL)
    lora = est("gpt2", mode="lora")
    assert lora.items["weights"] == 2 * (p + t)
    # bf16 ZeRO-0: BF16_Optimizer's fp32 gradient buffer (its immediate update frees the bf16 gradients)
    assert (lora.items["gradients"], lora.items["optimizer_states"]) == (4 * t, 12 * t)
    quantized = 12 * 12 * 768 * 768
    qlora = est("gpt2", mode="qlora")
    assert qlora.items["weights"] == int(quantized * mm.NF4_BYTES_PER_PARAM + (p - quantized) * 2 + 2 * t)


def test_activations_and_chunked_loss_by_hand():
    sbh, lse = 1024 * 768, 4 * 12 * 1024  # flash attention's fp32 logsumexp per head and token
    assert est("gpt2").items["activations"] == (32 * sbh + lse) * 12 + 4 * sbh == 305_725_440
    # checkpointing: each layer's input; the recomputed layer lives after the loss freed its chunk
    assert est("gpt2", ckpt=True).items["activations"] == 2 * sbh * 12 + 4 * sbh == 22_020_096
    # 256 MiB of fp32 logits is 1335 tokens at vocab 50257; one sequence (1024 tokens) is one chunk
    assert mm.LOSS_CHUNK_BYTES // (4 * 50257) == 1335
    assert est("gpt2").items["logits_and_loss"] == 1024 * 50257 * 12 + 2 * sbh * 2
    # larger micro-batches add only hidden states: the fp32 logits stay at one chunk; full mode also
    # holds one chunk's gradient of the tied embedding before it is added to wte.grad
    m8 = est("gpt2", micro=8).items["logits_and_loss"]
    assert m8 == 1335 * 50257 * 12 + 2 * 8 * sbh * 2 + 50257 * 768 * 2
    assert est("gpt2", micro=8, mode="lora").items["logits_and_loss"] == m8 - 50257 * 768 * 2
    # LoRA dropout: a bool mask per targeted input (7h) + attention's output copied (2h); lora_A's outputs
    r = 8
    lora = est("gpt2", mode="lora", lora_dropout=0.05).items["activations"]
    assert lora == (32 * sbh + lse + 1024 * r * 2 * 4 + 7 * sbh + 2 * sbh) * 12 + 4 * sbh


def test_peak_is_states_plus_the_larger_phase():
    e = est("gpt2", micro=4)
    i = e.items
    fixed = i["weights"] + i["gradients"] + i["optimizer_states"] + i["ds_buckets"]
    assert e.allocated == fixed + max(i["activations"] + i["logits_and_loss"], i["optimizer_step_transient"])
    assert e.total == e.allocated + i["context_and_fragmentation"]


# ----------------------------------------------------------------------------- search

def test_auto_picks_full_for_gpt2_at_80gb():
    plan = make_plan(cfg_for("gpt2"), gpu(80))
    assert (plan.mode, plan.zero_stage, plan.offload, plan.gradient_checkpointing) == ("full", 0, "none", False)
    assert plan.estimate.total <= plan.usable_bytes == int(0.95 * 80 * GiB)
    assert plan.estimate.params_total == plan.estimate.params_trainable == 124_439_808


def test_auto_gpt2_xl_at_8gb_is_cheaper():
    plan = make_plan(cfg_for("gpt2-xl"), gpu(8))
    assert plan.mode in ("lora", "qlora") or plan.gradient_checkpointing
    assert plan.mode != "full" and plan.offload == "none"
    assert "full needs at least" in plan.reasons["mode"]
    assert plan.estimate.total <= plan.usable_bytes


def test_largest_micro_batch_that_fits():
    plan = make_plan(cfg_for("gpt2"), gpu(16))
    hw = gpu(16)
    larger = [m for m in range(plan.micro_batch_size + 1, 65) if 64 % m == 0]
    ctx = Search(cfg_for("gpt2"), hw)
    for m in larger:
        cand = Candidate("full", 0, "none", False, m)
        assert ctx.estimate(cand).total > plan.usable_bytes


@pytest.mark.parametrize("model", list(GPT2_SHAPES))
def test_tokens_per_iteration_never_change(model):
    cfg = cfg_for(model)
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps
    for gb in (4, 8, 12, 16, 24, 40, 80):
        for n in (1, 2, 4, 8):
            for mode in ("auto", "full", "lora", "qlora"):
                try:
                    plan = make_plan(cfg.with_keys(mode=mode), gpu(gb, n))
                except PlanError:
                    continue
                assert plan.micro_batch_size * plan.grad_accum_per_rank * n == sequences
                assert plan.tokens_per_iteration == sequences * 1024
                assert not (plan.mode == "qlora" and plan.zero_stage == 3)
                assert plan.estimate.total <= plan.usable_bytes


def test_several_gpus_shard_with_zero():
    # 32-bit AdamW: with 8-bit states gpt2-xl fits 16 GB without sharding (BF16_Optimizer shards its masters)
    plan = make_plan(cfg_for("gpt2-xl", mode="full", optimizer="adamw"), gpu(16, 4))
    assert plan.zero_stage >= 1 and plan.offload == "none"
    assert "ZeRO-0 would need" in plan.reasons["zero_stage"]


def test_nothing_fits_names_smallest_memory_and_options():
    cfg = cfg_for("gpt2-xl", mode="full", offload="none")
    with pytest.raises(PlanError) as info:
        make_plan(cfg, gpu(8))
    msg = str(info.value)
    assert "\n" not in msg and "nothing fits" in msg
    assert "--mode=lora fits" in msg and "leaving offload on auto fits" in msg
    need = float(re.search(r"i\.e\. at least ([\d.]+) GiB per GPU", msg).group(1))
    # the named memory is the boundary: a little more fits, a little less does not
    assert make_plan(cfg, gpu(need + 0.01)).mode == "full"
    with pytest.raises(PlanError):
        make_plan(cfg, gpu(need - 0.05))


def test_nothing_fits_suggests_more_gpus_and_shorter_blocks():
    with pytest.raises(PlanError) as info:
        make_plan(cfg_for("gpt2-xl", mode="full", offload="none", optimizer="adamw"), gpu(12))
    assert re.search(r"--gpus=\d+ fits", str(info.value))
    assert re.search(r"--block_size=\d+ fits|--mode=", str(info.value))


def test_sequences_must_split_over_ranks():
    with pytest.raises(PlanError, match="3 ranks"):
        make_plan(cfg_for("gpt2-xl"), gpu(80, 3))


def test_user_fixed_keys_are_respected():
    plan = make_plan(cfg_for("gpt2", zero_stage=2, gradient_checkpointing=True, micro_batch_size=4, dtype="fp16"),
                     gpu(80))
    assert (plan.zero_stage, plan.gradient_checkpointing, plan.micro_batch_size, plan.dtype) == (2, True, 4, "fp16")
    assert plan.grad_accum_per_rank == 16
    assert all(plan.reasons[k].startswith("fixed by the user")
               for k in ("zero_stage", "gradient_checkpointing", "micro_batch_size", "dtype"))
    assert make_plan(cfg_for("gpt2", mode="lora"), gpu(80)).mode == "lora"
    assert make_plan(cfg_for("gpt2", mode="qlora"), gpu(80)).mode == "qlora"


def test_fixed_mode_allows_offload_auto_mode_does_not():
    # with 32-bit states at 12 GB no full plan of gpt2-xl fits on the GPU alone, not even without fp32 masters
    full = make_plan(cfg_for("gpt2-xl", mode="full", optimizer="adamw"), gpu(12))
    assert full.mode == "full" and full.offload != "none" and full.zero_stage >= 2
    assert full.estimate.host > 0
    auto = make_plan(cfg_for("gpt2-xl", optimizer="adamw"), gpu(12))
    assert auto.offload == "none" and auto.mode != "full"


def test_contradictions_are_one_line_errors():
    with pytest.raises(PlanError, match="ZeRO-3") as info:
        make_plan(cfg_for("gpt2", mode="qlora", zero_stage=3), gpu(80))
    assert "bitsandbytes" in str(info.value)
    with pytest.raises(PlanError, match="micro_batch_size=3"):
        make_plan(cfg_for("gpt2", micro_batch_size=3), gpu(80))
    with pytest.raises(PlanError, match="needs ZeRO-3"):
        make_plan(cfg_for("gpt2", offload="optimizer+params", zero_stage=2), gpu(80))
    with pytest.raises(PlanError, match="bf16"):
        make_plan(cfg_for("gpt2", dtype="bf16"), Hardware("cuda", 16 * GiB, 1, False, "old GPU"))


def test_fp16_when_no_bf16():
    plan = make_plan(cfg_for("gpt2"), Hardware("cuda", 16 * GiB, 1, False, "V100"))
    assert plan.dtype == "fp16" and "loss scaling" in plan.reasons["dtype"]


def test_cpu_budget_is_system_memory_in_fp32():
    hw = Hardware("cpu", 20 * GiB, 1, False, "CPU (no GPU): system memory")
    plan = make_plan(cfg_for("gpt2"), hw)
    assert plan.dtype == "fp32" and plan.offload == "none"
    assert "system memory" in plan.reasons["budget"]
    assert plan.estimate.items["context_and_fragmentation"] >= mm.CPU_PROCESS_BYTES


def test_detect_hardware_overrides():
    hw = detect_hardware(1, vram_gb=24, gpus=2)
    assert (hw.device_type, hw.bytes_per_device, hw.n_devices, hw.bf16) == ("cuda", 24 * GiB, 2, True)
    local = detect_hardware(2)
    assert local.n_devices == 2 and local.bytes_per_device > 0
    if local.device_type == "cpu":
        assert "system memory" in local.name


def test_plan_is_fast_for_gpt2_xl():
    start = time.perf_counter()
    make_plan(cfg_for("gpt2-xl"), gpu(8))
    with pytest.raises(PlanError):
        make_plan(cfg_for("gpt2-xl", mode="full", offload="none"), gpu(8))
    assert time.perf_counter() - start < 0.5


def test_outputs():
    plan = make_plan(cfg_for("gpt2-xl"), gpu(8))
    d = json.loads(json.dumps(plan_to_dict(plan)))
    for key in ("mode", "zero_stage", "offload", "gradient_checkpointing", "micro_batch_size", "total_bytes",
                "usable_bytes", "params_total", "params_trainable", "memory", "reasons"):
        assert key in d
    assert d["fits"] is True
    text = format_plan(plan)
    for item in ("weights", "gradients", "optimizer_states", "activations", "logits_and_loss", "ds_buckets",
                 "context_and_fragmentation", "usable", "gradient_checkpointing", "micro_batch_size"):
        assert item in text


# ----------------------------------------------------------------------------- step-down

def walk(plan, cfg, hw):
    steps = []
    while (plan := step_down(plan, cfg, hw)) is not None:
        steps.append(plan)
        assert plan.micro_batch_size * plan.grad_accum_per_rank * hw.n_devices == \
            cfg.batch_size * cfg.gradient_accumulation_steps
        assert plan.reasons["step_down"].startswith("out of memory with")
    return steps


def test_step_down_auto_sequence():
    cfg, hw = cfg_for("gpt2"), gpu(80)
    steps = walk(make_plan(cfg, hw), cfg, hw)
    first, second = steps[:2]
    assert first.gradient_checkpointing and first.micro_batch_size == 64 and not first.activation_offload
    assert second.activation_offload and second.micro_batch_size == 64
    assert [s.micro_batch_size for s in steps[2:8]] == [32, 16, 8, 4, 2, 1]
    assert (steps[8].optimizer, steps[9].grad_accum_dtype) == ("adamw8bit", "bf16")
    assert steps[10].mode == "lora" and "full -> lora" in steps[10].reasons["step_down"]
    assert steps[-1].mode == "qlora" and steps[-1].micro_batch_size == 1
    assert all(s.offload == "none" for s in steps)  # auto mode changes mode, not offload


def test_step_down_fixed_mode_offloads_then_stops():
    cfg, hw = cfg_for("gpt2-medium", mode="full", gradient_checkpointing=False), gpu(80)
    steps = walk(make_plan(cfg, hw), cfg, hw)
    assert not any(s.gradient_checkpointing or s.activation_offload for s in steps)  # the user fixed it off
    assert [s.micro_batch_size for s in steps[:5]] == [16, 8, 4, 2, 1]
    assert (steps[5].optimizer, steps[6].grad_accum_dtype) == ("adamw8bit", "bf16")
    assert [(s.offload, s.zero_stage, s.optimizer) for s in steps[7:]] == [("optimizer", 2, "adamw"),
                                                                          ("optimizer+params", 3, "adamw")]
    assert all(s.mode == "full" for s in steps)


def test_step_down_several_gpus_raises_zero_first():
    cfg, hw = cfg_for("gpt2-medium", mode="full", micro_batch_size=4, gradient_checkpointing=True), gpu(80, 2)
    steps = walk(make_plan(cfg, hw), cfg, hw)
    assert steps[0].activation_offload and steps[0].zero_stage == 0
    assert [s.zero_stage for s in steps[1:4]] == [1, 2, 3]
    assert all(s.micro_batch_size == 4 for s in steps)


def test_step_down_with_everything_fixed_is_none():
    cfg = cfg_for("gpt2", mode="full", zero_stage=0, offload="none", gradient_checkpointing=True,
                  micro_batch_size=1, optimizer="adamw", grad_accum_dtype="fp32", activation_offload=False)
    assert step_down(make_plan(cfg, gpu(80)), cfg, gpu(80)) is None


def test_model_shape_reads_config_json_without_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3, "n_head": 2, "n_embd": 64,
                                                      "vocab_size": 50257}))
    assert model_shape(Config(init_from=str(tmp_path), block_size=64), 65) == Shape(
        n_layer=3, n_head=2, n_embd=64, vocab_size=50257, block_size=64)
    assert model_shape(Config(init_from="resume", block_size=64), 65, tmp_path / "config.json").n_layer == 3
    assert model_shape(Config(init_from="gpt2-medium", block_size=64), 65) == Shape(
        n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=64)
    with pytest.raises(PlanError.__mro__[1], match="neither scratch, resume"):
        model_shape(Config(init_from=str(tmp_path / "missing"), block_size=64), 65)
