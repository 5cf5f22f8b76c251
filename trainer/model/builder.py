"""The module a plan trains, built one way: by the training setup, by an out-of-memory step-down, and by
`--plan --simulate` (which hands in a base made on the meta device instead of loaded weights).

base_model: the GPT-2 before the plan touches it (from init_from, a run's saved architecture, or the
frozen 4-bit base of a QLoRA run). build_module: the plan applied to it (gradient checkpointing, then the
adapters) inside the loss wrapper DeepSpeed trains.
"""
import torch

from trainer.config import ADAPTER_MODES
from trainer.model.adapters import apply_mode, build_base
from trainer.model.gpt2 import build_model, enable_checkpointing, fit_to_config, model_from_config_file
from trainer.model.loss import LMWithLoss
from trainer.model.neftune import add_neftune


def base_model(cfg, plan, vocab_size, device_type, model_config=None, run_dir=None):
    """The GPT-2 of a run, before checkpointing and adapters.

    model_config: rebuild that saved architecture (weights come from a checkpoint or the old engine);
    else adapter modes build the frozen base from init_from (4-bit for qlora) and full mode builds from
    init_from. The same seed on every rank: all ranks must build identical initial weights.
    """
    torch.manual_seed(cfg.seed)
    if model_config is not None:
        # the same trainable parameters as the saved run, hence the same optimizer groups
        return fit_to_config(model_from_config_file(model_config), cfg)
    if plan.mode in ADAPTER_MODES:
        return build_base(cfg, vocab_size, plan.mode, plan.dtype, device_type, run_dir=run_dir)
    return build_model(cfg, vocab_size)


def build_module(cfg, plan, base, packed_kernel, wrapper=LMWithLoss):
    """LMWithLoss (or the simulation's `wrapper`) around `base` with the plan applied: checkpointing first
    (before the adapters wrap the model), then LoRA/QLoRA for adapter modes, activation offload, and NEFTune's
    hooks if asked for."""
    if plan.gradient_checkpointing:
        enable_checkpointing(base)
    module = wrapper(apply_mode(base, plan, cfg), packed=packed_kernel, activation_offload=plan.activation_offload)
    if cfg.neftune_alpha > 0:
        add_neftune(module, cfg.neftune_alpha)
    return module
