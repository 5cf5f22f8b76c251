"""A finished run's trained weights, read back from its latest checkpoint: the adapters of a LoRA/QLoRA run,
and the adapter model rebuilt around its base (or another base: tools/loading.dequantized_base). Sampling,
evaluation and export read them (trainer/tools/), and so does a new run that continues this one (trainer/run/continuation.py).
"""
from dataclasses import replace
import torch

from trainer.config import ADAPTER_MODES
from trainer.errors import UserError
from trainer.model.adapters import build_base, lora_config, use_dequantizing_matmul, wrap_lora
from trainer.run.consolidate import consolidated_state_dict
from trainer.run.run_dir import RunDir


def adapter_state_dict(out_dir, tag=None):
    """The adapters of a checkpoint (`tag`, else the newest that verifies) as fp32 tensors, keyed as in the
    PeftModel's state_dict.

    ZeRO 1-3 checkpoints go through DeepSpeed's zero_to_fp32 (under ZeRO-3 the module file holds empty,
    shape-[0] tensors: the real values are only in the optimizer shards).
    """
    state = {k: v for k, v in consolidated_state_dict(out_dir, tag).items() if ".lora_" in k}
    if not state:
        raise UserError(f"the checkpoint in {out_dir} holds no LoRA adapters; was it trained with --mode=full?")
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise UserError(f"the checkpoint in {out_dir} holds empty adapter tensors ({empty[0]}); it is incomplete")
    return state


def adapter_model(out_dir, quantized=None, base=None):
    """A trained adapter run's base wrapped with its adapters as they start (before training), fp32 on the CPU.

    quantized=None: as trained (4-bit base for qlora); False: the original, unquantized weights (Conv1D
    layers). base: a base to wrap instead of rebuilding one (dequantized_base). PiSSA/OLoRA runs start here
    exactly as in training: the same decomposition of the same weights.
    """
    run_dir = RunDir(out_dir)
    cfg, mode = run_dir.config(), run_dir.mode()
    if mode not in ADAPTER_MODES:
        raise UserError(f"{out_dir} trained in mode {mode!r}, not lora or qlora")
    quantized = (mode == "qlora") if quantized is None else quantized
    torch.manual_seed(cfg.seed)  # a scratch base is rebuilt from the run's seed, as the loop built it
    if base is None:
        base = build_base(replace(cfg, dropout=0.0), run_dir.meta()["vocab_size"], "qlora" if quantized else "lora",
                          "fp32", "cpu", run_dir=out_dir)
    model = wrap_lora(base, lora_config(cfg, quantized=quantized))
    if quantized:
        use_dequantizing_matmul(model)
    return model


def load_adapter_run(out_dir, quantized=None, weights=None, base=None):
    """A trained adapter run as a PeftModel (eval mode, fp32 on the CPU): base rebuilt, adapters loaded.

    quantized=None: as trained (4-bit base for qlora); False: the adapters on the original, unquantized
    weights (Conv1D layers), which is what export merges into; base: another base (dequantized_base).
    weights: adapter_state_dict(out_dir), if the caller already has it.
    """
    weights = adapter_state_dict(out_dir) if weights is None else weights
    model = adapter_model(out_dir, quantized, base)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise UserError(f"the adapters in {out_dir} do not match its config.json (lora_r, lora_targets, "
                        f"use_dora): missing {missing[:2]}, unexpected {unexpected[:2]}")
    return model.eval()
