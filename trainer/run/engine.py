"""The DeepSpeed engine: a config from ds_configs/ plus the plan, AdamW's parameter groups, initialize."""
import copy
import json
import shutil
import sysconfig
from pathlib import Path

import deepspeed
import torch

from trainer.config import REPO_ROOT
from trainer.errors import UserError
from trainer.optim.optimizer import (adam_mini_optimizer, adamw_hyperparameters, client_optimizer, group_lr,
                                     is_client, master_optimizer, param_groups)
from trainer.optim.release import GradientRelease
from trainer.plan.memory import deepspeed_path

DS_CONFIGS = REPO_ROOT / "ds_configs"


def template_name(zero_stage, offload):
    """Which ds_configs/ template a plan starts from."""
    if offload != "none" and zero_stage >= 2:
        return f"zero{zero_stage}_offload"
    return f"zero{zero_stage}"


def zero_section(zero_stage, offload, on_gpu):
    name = template_name(zero_stage, offload)
    zero = json.loads((DS_CONFIGS / f"{name}.json").read_text())["zero_optimization"]
    if offload == "optimizer":
        zero.pop("offload_param", None)
    if offload != "none" and "offload_optimizer" not in zero:  # ZeRO-1 offload borrows ZeRO-2's section
        offload_src = json.loads((DS_CONFIGS / "zero2_offload.json").read_text())["zero_optimization"]
        zero["offload_optimizer"] = copy.deepcopy(offload_src["offload_optimizer"])
    for key in ("offload_optimizer", "offload_param"):
        if key in zero and not on_gpu:
            zero[key]["pin_memory"] = False  # pinned memory means nothing without a GPU
    return zero


def path_of_plan(plan):
    """Which of DeepSpeed's optimizer wrappers the plan runs on, and the engine's ZeRO stage
    (trainer/plan/memory.deepspeed_path)."""
    return deepspeed_path(plan.zero_stage, plan.offload, plan.dtype, plan.grad_accum_dtype, plan.master_weights)


def build_ds_config(cfg, plan, world_size, on_gpu):
    """The full DeepSpeed config for this run: batch sizes, precision, clipping, optimizer, ZeRO."""
    path = path_of_plan(plan)
    zero = {**zero_section(path.engine_stage, plan.offload, on_gpu), **plan.estimate.buckets,
            "stage": path.engine_stage}
    config = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_per_rank,
        "train_batch_size": plan.micro_batch_size * plan.grad_accum_per_rank * world_size,
        "gradient_clipping": 0.0 if clips_by_hand(plan) else max(cfg.grad_clip, 0.0),
        # the bucket sizes the planner counted replace the template's
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the trainer prints its own progress
        "wall_clock_breakdown": False,
    }
    if is_client(plan.optimizer) or path.optimizer == "bf16_weights":
        # bitsandbytes' optimizers come in as DeepSpeed's client optimizer (create_engine); ZeRO accepts them
        # only with this flag (it steps them on its flat fp32 partitions like any torch optimizer)
        config["zero_allow_untested_optimizer"] = True
    else:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                **{k: list(v) if k == "betas" else v for k, v in adamw_hyperparameters(cfg).items()},
                # torch's AdamW needs no compiled op; with offload DeepSpeed uses its CPU Adam instead
                "torch_adam": plan.offload == "none",
                # DeepSpeed passes the remaining params to torch.optim.AdamW (engine.get_optimizer_configuration):
                # on a GPU its fused kernel, one launch per step instead of per-tensor foreach kernels
                **({"fused": True} if on_gpu and plan.offload == "none" else {}),
            },
        }
    if plan.dtype == "bf16" and path.optimizer != "bf16_weights":  # (that path's module is bf16 already)
        config["bf16"] = {"enabled": True}
        if path.optimizer == "bf16_optimizer":
            # each bf16 gradient is added into the fp32 buffer as backward produces it and freed at once
            config["bf16"]["immediate_grad_update"] = True
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif plan.dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return config


def may_offload(plan, cfg, hw):
    """The plan offloads, or an out-of-memory step-down may switch to offload (trainer/plan/planner.step_down)."""
    return plan.offload != "none" or (hw.device_type == "cuda" and cfg.offload == "auto")


def ensure_cpu_adam():
    """Load DeepSpeed's CPU Adam op (offload's optimizer), building it now if it is not built yet.

    DeepSpeed builds it with torch's cpp_extension at the first offloaded step, which on a machine without
    a compiler would fail hours into a run (after a step-down); the setup calls this instead.
    """
    from deepspeed.ops.op_builder import CPUAdamBuilder
    try:
        CPUAdamBuilder().load(verbose=False)
        return
    except Exception as exc:  # noqa: BLE001 - any failure to build is reported as what to install
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    missing = []
    if not (shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++ compiler (apt-get install g++)")
    if not shutil.which("ninja"):
        missing.append("ninja (pip install ninja)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("the Python headers (apt-get install python3-dev)")
    what = "install " + ", ".join(missing) if missing else f"the build failed ({error})"
    raise UserError(f"offload uses DeepSpeed's CPU Adam op, which must be built on this machine: {what}; "
                    f"or pass --offload=none")


def compiles(cfg, on_gpu):
    """The `compile` key: auto compiles on GPUs only."""
    return on_gpu if cfg.compile == "auto" else cfg.compile


def create_engine(module, cfg, plan, world_size, on_gpu, load_universal=False):
    ds_config = build_ds_config(cfg, plan, world_size, on_gpu)
    if load_universal:  # resuming a checkpoint saved with another number of ranks
        ds_config["checkpoint"] = {"load_universal": True}
    path = path_of_plan(plan)
    if path.optimizer == "bf16_weights":
        # no fp32 copy: the module is bf16 and DeepSpeed, told of no precision, steps the client optimizer on it
        module.to(torch.bfloat16)
    if plan.optimizer == "adam_mini":  # on the module's own tensors, one group each, by name
        groups, optimizer = None, adam_mini_optimizer(module, cfg)
    elif path.optimizer == "bf16_weights":
        groups = param_groups(module, cfg.weight_decay)
        optimizer = master_optimizer(plan.master_weights, groups, cfg, plan.optimizer, plan.optimizer_in_backward)
    else:
        groups = param_groups(module, cfg.weight_decay, cfg.loraplus_lr_ratio)
        optimizer = client_optimizer(plan.optimizer, groups, cfg)  # None: torch's AdamW from the config
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups if optimizer is None else None,
                                           optimizer=optimizer, config=ds_config)
    if world_size == 1 and path.optimizer in ("plain", "bf16_optimizer", "bf16_weights"):
        # One rank has nothing to average: DeepSpeed's ZeRO-0 all-reduce would only copy the gradients (the
        # BF16_Optimizer's fp32 buffer into bf16 and back: 2 bytes per parameter, and its precision). The
        # unfused path keeps it: without it FP16_UnfusedOptimizer's step holds 2 bytes per parameter more
        # (measured, tests/optimizer_step.py).
        engine.enable_backward_allreduce = False
    # the step inside the backward: its hooks on the module's parameters (DeepSpeed's module is ours)
    engine.gradient_release = GradientRelease(module, optimizer, cfg.grad_clip) \
        if plan.optimizer_in_backward else None
    if compiles(cfg, on_gpu):
        # module.compile() in place: parameter names and checkpoints stay those of the uncompiled module
        engine.compile()
    return engine, ds_config


def set_lr(engine, lr):
    """The schedule's learning rate on every optimizer group (LoRA+'s B group keeps its ratio to it)."""
    for group in engine.optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep it a tensor (compiled steps read it)
            group["lr"].fill_(group_lr(group, lr))
        else:
            group["lr"] = group_lr(group, lr)


def clips_by_hand(plan):
    """DeepSpeed's ZeRO and 16-bit optimizers report the grad norm and skip non-finite steps; with
    plain fp32 at stage 0, or bf16 weights without masters (no precision section), it does neither, so the
    trainer clips and skips itself."""
    return path_of_plan(plan).optimizer in ("plain", "bf16_weights")


def clip_or_skip(engine, max_norm):
    """Clip the accumulated (already all-reduced) gradients; drop them if not finite. Returns the norm.

    Dropped gradients (None) make torch's AdamW skip every parameter: a skipped step.
    """
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not torch.isfinite(norm):
        engine.zero_grad()
    elif max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
