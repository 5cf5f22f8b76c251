"""The GPU paths, checked on the CPU: the optimizer path per plan (a real DeepSpeed engine), precision from
a faked compute capability, MFU's FLOPs and peak table, the CPU Adam check at start, FlexAttention for
packed batches against the dense-mask SDPA, and `compile` against eager losses.

Faked here: torch.cuda's answers about the device (its name, memory and compute capability), nothing else.
"""
import os
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from trainer.config import Config  # noqa: E402
from trainer.model.attention import document_block_mask, packed_causal_mask  # noqa: E402
from trainer.model.gpt2 import build_model  # noqa: E402
from trainer.model.loss import LMWithLoss  # noqa: E402
from trainer.model.shapes import Shape, flops_per_token, model_shape  # noqa: E402
from trainer.optim.optimizer import param_groups  # noqa: E402
from trainer.plan.hardware import PEAK_FLOPS, Hardware, detect_hardware, gpu_model, peak_flops  # noqa: E402
from trainer.plan.memory import Candidate, estimate  # noqa: E402
from trainer.plan.planner import PlanError, PlanInput, make_plan  # noqa: E402
from trainer.run.engine import build_ds_config, path_of_plan  # noqa: E402

TINY = Config(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, gradient_accumulation_steps=2, dropout=0.0,
              compile=False)
GiB = 2**30


def plan_for(device_type, dtype, zero_stage=0, offload="none", bf16=True, accum="auto", optimizer="auto",
             master_weights="fp32"):
    """The plan of TINY; fp32 masters unless asked otherwise (the paths of bf16 weights without them:
    tests/test_master_weights.py)."""
    hw = Hardware(device_type, 16 * GiB, 1, bf16, "test")
    cfg = replace(TINY, dtype=dtype, zero_stage=zero_stage, offload=offload, grad_accum_dtype=accum,
                  optimizer=optimizer, master_weights=master_weights)
    return make_plan(PlanInput.of(cfg, model_shape(TINY, 65)), hw)


# ----------------------------------------------------------------------------- 1. optimizer path per plan

@pytest.mark.parametrize("device,dtype,zero,offload,accum,stage,fused,fp32_accum", [
    ("cuda", "bf16", 0, "none", "auto", 1, True, True),       # the fast bf16 path: BF16_Optimizer
    ("cuda", "bf16", 0, "none", "bf16", 0, True, False),      # bf16 accumulation: FP16_UnfusedOptimizer
    ("cuda", "bf16", 1, "none", "auto", 1, True, False),      # ZeRO-1 keeps stage_1_and_2's flat partitions
    ("cuda", "bf16", 2, "none", "auto", 2, True, False),      # ZeRO-2 keeps its own flat partitions
    ("cuda", "fp16", 0, "none", "auto", 0, True, False),      # no bf16: FP16 loss scaling, fused AdamW
    ("cuda", "bf16", 2, "optimizer", "auto", 2, False, False),  # offload: DeepSpeed's CPU Adam
    ("cpu", "fp32", 0, "none", "auto", 0, False, False),      # the CPU keeps what it had
    ("cpu", "bf16", 0, "none", "auto", 1, False, True),       # bf16 on the CPU: BF16_Optimizer as on GPUs
])
def test_ds_config_per_plan(device, dtype, zero, offload, accum, stage, fused, fp32_accum):
    plan = plan_for(device, dtype, zero, offload, accum=accum)
    ds = build_ds_config(TINY, plan, 1, on_gpu=device == "cuda")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["optimizer"]["params"].get("fused", False) is fused
    assert ds["optimizer"]["params"]["torch_adam"] is (offload == "none")
    assert (ds.get("data_types") == {"grad_accum_dtype": "fp32"}) is fp32_accum
    assert ds.get("bf16", {}).get("immediate_grad_update", False) is fp32_accum  # bf16 grads freed as added
    assert (path_of_plan(plan).optimizer == "bf16_optimizer") is fp32_accum
    assert path_of_plan(plan).engine_stage == stage  # the one rule the config was written from


def test_auto_keeps_fp32_masters_on_a_gpu_where_they_fit_and_takes_the_faster_step_on_the_cpu():
    """Where fp32 masters fit, a GPU plan keeps them (bf16 weights without them cost no time by the cost model,
    and equal times go to fewer tools); on the CPU torch-optimi's Kahan step is measured 4.6x faster than
    BF16_Optimizer's (bench/RESULTS.md), so bf16 training there takes it (trainer/plan/cost.py)."""
    assert plan_for("cuda", "bf16", master_weights="auto").master_weights == "fp32"
    cpu = plan_for("cpu", "bf16", master_weights="auto")
    assert cpu.master_weights == "bf16_kahan" and not cpu.optimizer_in_backward
    assert path_of_plan(cpu).optimizer == "bf16_weights"
    assert plan_for("cpu", "fp32", master_weights="auto").master_weights == "fp32"  # fp32 training has no masters


@pytest.mark.parametrize("zero", [0, 2])
def test_bitsandbytes_optimizers_are_client_optimizers(zero):
    plan = plan_for("cuda", "bf16", zero, optimizer="adamw8bit")
    ds = build_ds_config(TINY, plan, 1, on_gpu=True)
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file:///tmp/gpt2ds_pg_{os.getpid()}", rank=0, world_size=1)
    return dist


@pytest.mark.slow  # a DeepSpeed engine: 10-60 s on a shared 2-core machine
def test_fast_bf16_config_builds_deepspeeds_bf16_optimizer_around_fused_adamw(process_group):
    """The config the fast path writes, built by DeepSpeed for real (on the CPU): BF16_Optimizer with a flat
    fp32 gradient buffer, torch's AdamW with fused=True inside, and steps that lower the loss."""
    import deepspeed
    plan = plan_for("cuda", "bf16", 0)
    ds = build_ds_config(TINY, plan, 1, on_gpu=True)
    torch.manual_seed(0)
    module = LMWithLoss(build_model(TINY, 65))
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, 0.1), config=ds)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer" and engine.optimizer.immediate_grad_update
    assert type(engine.basic_optimizer) is torch.optim.AdamW and engine.basic_optimizer.defaults["fused"] is True
    buffers = engine.optimizer.fp32_groups_gradients_flat
    assert all(b.dtype == torch.float32 for b in buffers)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert sum(b.numel() for b in buffers) >= trainable  # what trainer/plan/memory.gradient_bytes counts
    x = torch.randint(0, 65, (plan.micro_batch_size, 16))
    losses = []
    for _ in range(3 * plan.grad_accum_per_rank):
        loss = engine(x, x)
        engine.backward(loss)
        assert all(p.grad is None for p in module.parameters())  # added into the fp32 buffer and freed
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.isfinite(torch.as_tensor(engine.get_global_grad_norm()))


def test_memory_model_counts_the_fp32_gradient_buffer():
    shape = Shape(12, 12, 768, 50257, 1024)
    cand = Candidate("full", 0, "none", False, 1)
    fast = estimate(shape, cand, "bf16", 1, "cuda", 70 * GiB)
    fp16 = estimate(shape, cand, "fp16", 1, "cuda", 70 * GiB)
    trainable = 124_439_808 + 1024 * 768 - 1024 * 768  # GPT-2 124M, tied embeddings
    # the fp32 buffer instead of the bf16 gradients, which immediate_grad_update frees as they are added in
    assert fast.items["gradients"] == 4 * trainable and fp16.items["gradients"] == 2 * trainable


# ----------------------------------------------------------------------------- 3. precision

def fake_gpu(monkeypatch, name, capability, total=16 * GiB):
    """torch.cuda answering for one GPU of this name and compute capability; is_bf16_supported says True
    whatever the capability, as torch does on V100 and T4 (it counts emulation)."""
    props = types.SimpleNamespace(name=name, total_memory=total, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)


@pytest.mark.parametrize("name,capability,dtype", [
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16"), ("Tesla T4", (7, 5), "fp16"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"), ("NVIDIA H100 80GB HBM3", (9, 0), "bf16")])
def test_bf16_only_with_bf16_tensor_cores(monkeypatch, name, capability, dtype):
    fake_gpu(monkeypatch, name, capability)
    hw = detect_hardware(1)
    assert hw.device_type == "cuda" and hw.bf16 is (dtype == "bf16")
    shape = model_shape(TINY, 65)
    plan = make_plan(PlanInput.of(TINY, shape), hw)
    assert plan.dtype == dtype
    if dtype == "fp16":
        ds = build_ds_config(TINY, plan, 1, on_gpu=True)
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
        with pytest.raises(PlanError) as err:
            make_plan(PlanInput.of(replace(TINY, dtype="bf16"), shape), hw)
        assert "\n" not in str(err.value) and "dtype=fp16" in str(err.value)


# ----------------------------------------------------------------------------- 4. MFU

@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", ("h100", "sxm")), ("NVIDIA H100 PCIe", ("h100", "pcie")),
    ("NVIDIA H100 NVL", ("h100", "nvl")), ("NVIDIA H200", ("h200", "sxm")), ("NVIDIA H200 NVL", ("h200", "nvl")),
    ("NVIDIA A100-SXM4-80GB", ("a100", "")), ("NVIDIA A100 80GB PCIe", ("a100", "")),
    ("NVIDIA A10G", ("a10g", "")), ("NVIDIA A10", ("a10", "")), ("NVIDIA L40S", ("l40s", "")),
    ("NVIDIA L40", ("l40", "")), ("NVIDIA L4", ("l4", "")), ("NVIDIA GeForce RTX 4090", ("4090", "")),
    ("NVIDIA GeForce RTX 3090", ("3090", "")), ("Tesla V100-SXM2-16GB", ("v100", "sxm")),
    ("Tesla V100-PCIE-32GB", ("v100", "pcie")), ("Tesla T4", ("t4", ""))])
def test_gpu_names_match_their_own_row(name, key):
    assert gpu_model(name) == key
    flops, source = peak_flops(name)
    assert flops == PEAK_FLOPS[key][0] and "datasheet" in source or "whitepaper" in source or "AWS" in source


def test_peak_table_is_dense_with_sources():
    assert peak_flops("NVIDIA H100 PCIe")[0] == pytest.approx(756e12, rel=0.01)
    assert peak_flops("NVIDIA L40S")[0] == pytest.approx(362e12, rel=0.01)
    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989e12, rel=0.01)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D", "AMD Instinct MI300X",
                                  "NVIDIA B200", "Tesla V100-FHHL-16GB"])
def test_unknown_gpus_get_no_mfu_and_a_reason(name):
    flops, why = peak_flops(name)
    assert flops is None and name in why and "\n" not in why


def test_flops_per_token_by_mode():
    n, adapters, L, C, T = 124_000_000, 800_000, 12, 768, 1024
    attention = 12 * L * C * T
    assert flops_per_token(n, L, 12, C, T) == 6 * n + attention
    lora = flops_per_token(n, L, 12, C, T, mode="lora", n_trainable=adapters)
    assert lora == 4 * (n - adapters) + 6 * adapters + attention
    # the old count (6N for every mode) read LoRA's MFU 1.4x too high at block 1024 (1.5x without attention)
    assert flops_per_token(n, L, 12, C, T) / lora == pytest.approx(1.40, abs=0.02)


def test_mfu_reason_is_said_once(capsys):
    from trainer.run.logger import RunLogger
    log = RunLogger(REPO, True, False, 10, 0)
    for _ in range(3):
        log.print_once("mfu", "no MFU: because")
    log.close()
    assert capsys.readouterr().out.count("no MFU: because") == 1


# ----------------------------------------------------------------------------- 7. CPU Adam at start

def test_offload_without_a_compiler_fails_at_start_naming_what_to_install(tmp_path):
    """No compiler and no ninja on PATH, no built op in the extensions folder: one line that says what to install."""
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from trainer.run.engine import ensure_cpu_adam\nfrom trainer.errors import UserError\n"
            "try:\n    ensure_cpu_adam()\nexcept UserError as e:\n    print('error:', e)\n")
    env = {"HOME": str(tmp_path), "PATH": str(tmp_path / "nothing"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    assert "g++" in lines[0] and "ninja" in lines[0] and "--offload=none" in lines[0]


def test_cpu_adam_is_needed_whenever_a_step_down_may_offload():
    from trainer.run.engine import may_offload
    gpu, cpu = Hardware("cuda", GiB, 1, True, "g"), Hardware("cpu", GiB, 1, False, "c")
    plan = plan_for("cuda", "bf16")
    assert may_offload(plan, Config(offload="auto"), gpu)
    assert not may_offload(plan, Config(offload="none"), gpu)
    assert not may_offload(plan_for("cpu", "fp32"), Config(offload="auto"), cpu)
    assert may_offload(plan_for("cuda", "bf16", 2, "optimizer"), Config(offload="optimizer"), gpu)


# ----------------------------------------------------------------------------- 6. packed data

def test_flex_attention_document_mask_equals_dense_mask_sdpa():
    """FlexAttention (eager on the CPU: torch's reference path, forward only; compiled on GPUs) against today's
    dense mask. Tolerance 1e-5 on fp32 logits (measured: 3e-7)."""
    cfg = replace(TINY, n_layer=2, n_embd=64, block_size=256)
    torch.manual_seed(0)
    idx = torch.randint(0, 65, (2, 256))
    pos = torch.stack([torch.cat([torch.arange(100), torch.arange(156)]),
                       torch.cat([torch.arange(30), torch.arange(200), torch.arange(26)])])
    targets = idx.clone()
    dense = LMWithLoss(build_model(cfg, 65))
    flex = LMWithLoss(build_model(cfg, 65), packed="flex")
    flex.load_state_dict(dense.state_dict())
    with torch.no_grad():
        ref = dense.lm(input_ids=idx, position_ids=pos, attention_mask=packed_causal_mask(pos)).logits
        out = flex.lm(input_ids=idx, position_ids=pos, packed_block_mask=document_block_mask(pos)).logits
        plain = flex.lm(input_ids=idx).logits  # plain text still goes through SDPA, causal
        loss_dense, loss_flex = dense(idx, targets, pos), flex(idx, targets, pos)  # the trainer's own call
    assert (out - ref).abs().max() < 1e-5
    assert (plain - ref).abs().max() > 1e-2  # the masks do keep the examples apart
    assert abs(float(loss_dense) - float(loss_flex)) < 1e-5
    # torch 2.13 has no FlexAttention backward on the CPU ("does not support backward on CPU"): the backward
    # is exercised only on a GPU, by bench/gpu_check.py's packed step


# ----------------------------------------------------------------------------- 2. compile

def engine_losses(process_group, compile_model, steps=3):
    """Losses of a tiny GPT-2 (gradient checkpointing on) trained by the trainer's DeepSpeed engine."""
    from trainer.model.gpt2 import enable_checkpointing
    from trainer.run.engine import create_engine
    cfg = replace(TINY, compile=compile_model)
    plan = plan_for("cpu", "fp32")
    torch.manual_seed(0)
    lm = build_model(cfg, 65)
    enable_checkpointing(lm)
    engine, _ = create_engine(LMWithLoss(lm), cfg, plan, 1, on_gpu=False)
    assert engine.is_compiled is compile_model
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps * plan.grad_accum_per_rank):
        x = torch.randint(0, 65, (plan.micro_batch_size, 16), generator=gen)
        loss = engine(x, torch.roll(x, -1, 1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    names = [n for n, _ in engine.module.named_parameters()]
    return losses, names


@pytest.mark.slow  # torch.compile of a model on 2 CPU cores
def test_compile_gives_the_eager_losses(process_group):
    """compile=True through DeepSpeed's engine.compile(): the same losses as eager within 1e-4 (relative) over
    3 optimizer steps, with gradient checkpointing on, and the same parameter names (checkpoints, resume)."""
    eager, eager_names = engine_losses(process_group, False)
    compiled, compiled_names = engine_losses(process_group, True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert compiled_names == eager_names


def test_runs_use_expandable_segments_unless_the_user_chose():
    """trainer/launcher.use_expandable_segments (launch/train.py and bench/gpu_check.py call it first): the
    fragmentation margin of the plan assumes expandable segments; a user's allocator setting is kept."""
    from trainer.launcher import use_expandable_segments
    env = {}
    assert use_expandable_segments(env) == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = {name: "max_split_size_mb:128"}
        assert use_expandable_segments(env) == f"{name}=max_split_size_mb:128" and env == {name: "max_split_size_mb:128"}
    # a training launch sets it in its own process before torch starts CUDA
    code = ("import runpy, sys, os; sys.argv=['train.py', '--help']\n"
            "try: runpy.run_path('launch/train.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('ALLOC', os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True).stdout
    assert "ALLOC expandable_segments:True" in out, out
