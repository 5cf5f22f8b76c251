"""The chosen plan drives the run: each plan key lands in the DeepSpeed config the engine is built from.

ZeRO stage and offload pick the ds_configs/ template, the planner's bucket sizes replace the
template's, the dtype gives bf16 / fp16 with dynamic loss scaling / fp32, and micro-batch x
accumulation x ranks keep the recipe's sequences per iteration. (Checkpointing is HF's,
non-reentrant, turned on by the loop and by trainer/run/oom.py; tests/test_oom.py runs it.)
"""
import dataclasses

import pytest

from trainer.config import Config
from trainer.model.shapes import GPT2_SHAPES, Shape
from trainer.plan.hardware import detect_hardware
from trainer.plan.planner import PlanInput, make_plan
from trainer.run.engine import build_ds_config, template_name


def cfg_for(model="gpt2-medium", **keys):
    return Config(**{"block_size": 1024, "batch_size": 4, "gradient_accumulation_steps": 8, **keys})


def plan_of(cfg, hw, model="gpt2-medium"):
    return make_plan(PlanInput.of(cfg, Shape(*GPT2_SHAPES[model], 50257, cfg.block_size)), hw)


@pytest.mark.parametrize("zero,offload,template", [
    (0, "none", "zero0"), (1, "none", "zero1"), (2, "none", "zero2"), (3, "none", "zero3"),
    (2, "optimizer", "zero2_offload"), (3, "optimizer", "zero3_offload"), (3, "optimizer+params", "zero3_offload")])
def test_zero_stage_offload_and_buckets(zero, offload, template):
    cfg = cfg_for(mode="full", zero_stage=zero, offload=offload)
    hw = detect_hardware(2, vram_gb=80, gpus=2)
    plan = plan_of(cfg, hw)
    ds = build_ds_config(cfg, plan, 2, on_gpu=True)
    section = ds["zero_optimization"]
    # bf16 ZeRO-0 on a GPU is built as DeepSpeed ZeRO-1 with fp32 accumulation (docs/gpu.md)
    assert template_name(zero, offload) == template and section["stage"] == max(zero, plan.dtype == "bf16")
    assert ("offload_optimizer" in section) == (offload != "none")
    assert ("offload_param" in section) == (offload == "optimizer+params")
    for key, value in plan.estimate.buckets.items():  # the sizes the memory model counted
        assert section[key] == value
    assert ds["optimizer"]["params"]["torch_adam"] == (offload == "none")  # DeepSpeed's CPU Adam with offload


@pytest.mark.parametrize("gb,gpus", [(8, 1), (24, 1), (80, 1), (16, 4)])
def test_micro_batch_and_accumulation(gb, gpus):
    cfg = cfg_for(batch_size=8, gradient_accumulation_steps=8)
    plan = plan_of(cfg, detect_hardware(gpus, vram_gb=gb, gpus=gpus))
    ds = build_ds_config(cfg, plan, gpus, on_gpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == plan.micro_batch_size
    assert ds["gradient_accumulation_steps"] == plan.grad_accum_per_rank
    assert ds["train_batch_size"] == 64  # the recipe's sequences per iteration, whatever the plan


def test_precision_sections():
    cfg = cfg_for()
    bf16 = plan_of(cfg, detect_hardware(1, vram_gb=80, gpus=1))
    assert build_ds_config(cfg, bf16, 1, True)["bf16"] == {"enabled": True, "immediate_grad_update": True}
    no_bf16 = dataclasses.replace(detect_hardware(1, vram_gb=80, gpus=1), bf16=False)  # e.g. a V100 or T4
    fp16 = plan_of(cfg, no_bf16)
    section = build_ds_config(cfg, fp16, 1, True)["fp16"]
    assert fp16.dtype == "fp16" and section["enabled"] and section["loss_scale"] == 0  # 0: dynamic scaling
    fp32 = plan_of(cfg_for(dtype="fp32"), detect_hardware(1, vram_gb=80, gpus=1))
    ds = build_ds_config(cfg, fp32, 1, True)
    assert "bf16" not in ds and "fp16" not in ds
