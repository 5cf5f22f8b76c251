"""The simulated training step (trainer/plan/simulate.py) against the memory model, on a handful of the rows
of bench/SIMULATE.md (the whole table: python bench/simulate_table.py). Fake tensors: no weights, no GPU."""
import json
from dataclasses import replace

import pytest
import torch

from bench.plan_table import recipe_cfg
from tests.conftest import python, run_cmd
from trainer.model.shapes import Shape
from trainer.plan import cuda_kernels
from trainer.plan.hardware import detect_hardware
from trainer.plan.memory import Candidate, estimate
from trainer.plan.planner import PlanInput, make_plan
from trainer.plan.simulate import comparison, simulate


def plan_for(model="gpt2", **fixed):
    cfg, shape = recipe_cfg(model, zero_stage=0, offload="none", **fixed)
    return cfg, shape, make_plan(PlanInput.of(cfg, shape), detect_hardware(1, vram_gb=1000, gpus=1))


@pytest.mark.parametrize("mode,ckpt,micro,dtype,tools", [
    ("full", False, 1, "bf16", {}), ("full", True, 4, "fp16", {}), ("lora", True, 4, "bf16", {}),
    ("qlora", False, 1, "fp16", {}),
    # the toolbox: 8-bit states with activation offload, bf16 accumulation (FP16_UnfusedOptimizer), 8-bit LoRA
    ("full", True, 4, "bf16", {"optimizer": "adamw8bit", "activation_offload": True}),
    ("full", False, 1, "bf16", {"grad_accum_dtype": "bf16"}),
    ("lora", True, 2, "bf16", {"optimizer": "adamw8bit"}),
    # micro-batch 64 with recomputation: the peak is a recomputed layer's backward, not the loss
    ("full", True, 64, "bf16", {"optimizer": "adamw8bit", "activation_offload": True}),
    ("lora", True, 64, "bf16", {}),
    # Adam-mini on the module's own tensors: on bf16 weights, and on fp32 ones (the plain path)
    ("full", False, 1, "bf16", {"optimizer": "adam_mini", "master_weights": "bf16"}),
    ("full", False, 1, "fp32", {"optimizer": "adam_mini"})])
def test_estimate_within_5_percent_of_the_simulated_step(mode, ckpt, micro, dtype, tools):
    batch = {"batch_size": 64, "gradient_accumulation_steps": 1} if micro > 32 else {}
    cfg, shape, plan = plan_for(mode=mode, gradient_checkpointing=ckpt, micro_batch_size=micro, dtype=dtype,
                                **batch, **tools)
    assert (plan.mode, plan.gradient_checkpointing, plan.micro_batch_size) == (mode, ckpt, micro)
    sim = simulate(cfg, shape, plan)
    rows = {r["item"]: r for r in comparison(plan, sim)}
    assert abs(rows["activations_and_logits"]["difference"]) <= 0.05, rows
    assert abs(rows["optimizer_step_transient"]["difference"]) <= 0.05, rows
    # at ZeRO-0 on one GPU the simulation holds the model states exactly as the engine does
    for item in ("weights", "gradients", "optimizer_states"):
        assert abs(rows[item]["difference"]) <= 0.001, rows[item]


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_init": "pissa", "loraplus_lr_ratio": 16.0}])
def test_lora_variants_counted_as_simulated(variant):
    """DoRA's magnitudes and its kept outputs (memory.DORA_KEPT_OUTPUTS), LoRA+'s optimizer group of B matrices
    (a second flat fp32 buffer on the fast bf16 path) and PiSSA's start (nothing more): the adapters come from
    the same lora_config in the simulation as in training."""
    cfg, shape, plan = plan_for(mode="lora", gradient_checkpointing=False, micro_batch_size=2, dtype="bf16",
                                lora_dropout=0.0, **variant)
    sim = simulate(cfg, shape, plan)
    rows = {r["item"]: r for r in comparison(plan, sim)}
    for item in ("activations_and_logits", "optimizer_step_transient"):
        assert abs(rows[item]["difference"]) <= 0.02, rows[item]
    for item in ("weights", "gradients", "optimizer_states"):
        assert abs(rows[item]["difference"]) <= 0.001, rows[item]
    plain_cfg, _, plain = plan_for(mode="lora", gradient_checkpointing=False, micro_batch_size=2, dtype="bf16",
                                   lora_dropout=0.0)
    extra = plan.estimate.items["activations"] - plain.estimate.items["activations"]
    # DoRA: 2 bf16 outputs per token of each adapted projection (3c + c + 4c + c outputs per layer)
    assert extra == (12 * 2 * 1024 * 2 * 2 * 9 * 768 if cfg.use_dora else 0)
    assert plan.estimate.params_trainable - plain.estimate.params_trainable == (12 * 9 * 768 if cfg.use_dora else 0)


def test_simulated_step_does_not_depend_on_the_garbage_collector():
    """DoRA's detached weight-norm graph sits in a reference cycle with MemTracker's hooks: the simulation frees
    it when the adapter layer returns (simulate.graphs_freed_as_in_training), not whenever Python's collector
    happens to run (a CI run once counted 2.7% more than a local one)."""
    import gc
    cfg, shape, plan = plan_for(mode="lora", gradient_checkpointing=False, micro_batch_size=1, dtype="bf16",
                                block_size=256, lora_dropout=0.0, use_dora=True)
    thresholds = gc.get_threshold()
    try:
        gc.disable()
        never = simulate(cfg, shape, plan).items
        gc.enable()
        gc.set_threshold(1, 1, 1)
        always = simulate(cfg, shape, plan).items
    finally:
        gc.enable()
        gc.set_threshold(*thresholds)
    assert never == always


def test_neftune_keeps_nothing_for_the_backward():
    """NEFTune's noise is added to the embedding output and not kept: the simulated step of a packed batch (its
    per-example lengths computed with static shapes, as fake tensors need) holds what it holds without it."""
    cfg, shape, plan = plan_for(mode="lora", gradient_checkpointing=False, micro_batch_size=1, dtype="bf16",
                                block_size=256, neftune_alpha=5.0)
    shape = Shape(2, shape.n_head, shape.n_embd, shape.vocab_size, 256)
    with_noise = simulate(cfg, shape, plan, packed=True).items
    assert with_noise == simulate(replace(cfg, neftune_alpha=0.0), shape, plan, packed=True).items


def test_packed_instruction_batches_keep_a_mask_per_layer():
    cfg, shape, plan = plan_for(mode="full", gradient_checkpointing=False, micro_batch_size=2, dtype="bf16")
    packed = simulate(cfg, shape, plan, packed=True).items["activations_and_logits"]
    shape = Shape(12, 12, 768, 50257, 1024)
    cand = Candidate("full", 0, "none", False, 2)
    est = estimate(shape, cand, "bf16", 1, "cuda", 70 * 2**30, packed=True)
    assert abs(est.items["activations"] + est.items["logits_and_loss"] - packed) / packed <= 0.05
    plain = estimate(shape, cand, "bf16", 1, "cuda", 70 * 2**30)
    assert est.items["activations"] - plain.items["activations"] == 12 * 2 * 1024 * 1024 * 2 + 2 * 1024 * 1024


def test_cuda_kernels_flash_attention_no_causal_mask_bool_dropout_masks():
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = []
    real = cuda_kernels.cuda_sdpa

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    cfg, shape, plan = plan_for(mode="lora", gradient_checkpointing=False, micro_batch_size=1, dtype="bf16")
    shape = Shape(1, shape.n_head, shape.n_embd, shape.vocab_size, shape.block_size)
    cuda_kernels.cuda_sdpa = spy
    try:
        simulate(cfg, shape, plan)
    finally:
        cuda_kernels.cuda_sdpa = real
    assert calls and all(m is None for m in calls)  # causal text: flash, no mask built
    with FakeTensorMode(), cuda_kernels.cuda_kernels():
        x = torch.empty(4, 8, dtype=torch.bfloat16, requires_grad=True)
        out = torch.nn.functional.dropout(x, 0.1, True)
        q = torch.empty(1, 2, 16, 4, dtype=torch.bfloat16, requires_grad=True)
        att = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        saved = [t for t in att.grad_fn.saved_tensors]
    assert out.grad_fn.name() == "NativeDropoutBackward0"
    assert out.grad_fn._saved_result1.dtype == torch.bool  # the mask native_dropout keeps for backward
    assert saved[-1].dtype == torch.float32 and saved[-1].shape == (1, 2, 16)  # the log-sum-exp
    assert att.transpose(1, 2).is_contiguous()  # laid out (b, s, h, d) as flash writes it


@pytest.mark.slow
def test_plan_simulate_json_keeps_the_plan_keys(tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = run_cmd(python("launch/train.py", "--recipe", "gpt2_small", "--plan", "--vram_gb=16", "--simulate",
                         "--json", f"--out_dir={tmp_path / 'out'}"), cwd=repo)
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("micro_batch_size", "gradient_checkpointing"):
        assert key in plan
    assert {"activations", "logits_and_loss"} <= set(plan["memory"])
    rows = {r["item"]: r for r in plan["simulation"]["items"]}
    assert abs(rows["activations_and_logits"]["difference"]) <= 0.05
