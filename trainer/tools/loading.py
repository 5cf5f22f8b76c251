"""Load a trained model for sampling, evaluation and export: a run's out_dir, an HF directory, or a hub name.

A full run is rebuilt from its saved architecture and the latest checkpoint's consolidated weights; an
adapter run (LoRA/QLoRA) from its original base (init_from) and the adapters in its checkpoint.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import ADAPTER_MODES
from trainer.data.tokenizer import CharTokenizer, Gpt2Tokenizer, load_tokenizer
from trainer.errors import UserError
from trainer.model.adapters import build_base, lora_config, use_dequantizing_matmul, wrap_lora
from trainer.model.gpt2 import load_pretrained, model_from_config_file
from trainer.model.shapes import HUB_NAMES
from trainer.run.checkpoint import consolidated_state_dict
from trainer.run.run_dir import RunDir


@dataclass
class LoadedModel:
    lm: torch.nn.Module  # a GPT2LMHeadModel (or a PeftModel around one)
    tokenizer: Gpt2Tokenizer | CharTokenizer
    block_size: int
    vocab_limit: int  # rows past this are vocabulary padding, never sampled
    run_config: dict | None  # the resolved config of a training run, None for HF models


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


def load_adapter_run(out_dir, quantized=None, weights=None):
    """A trained adapter run as a PeftModel (eval mode, fp32 on the CPU): base rebuilt, adapters loaded.

    quantized=None: as trained (4-bit base for qlora); False: the adapters on the original, unquantized
    weights (Conv1D layers), which is what export merges into. weights: adapter_state_dict(out_dir), if
    the caller already has it.
    """
    run_dir = RunDir(out_dir)
    cfg, mode = run_dir.config(), run_dir.mode()
    if mode not in ADAPTER_MODES:
        raise UserError(f"{out_dir} trained in mode {mode!r}, not lora or qlora")
    quantized = (mode == "qlora") if quantized is None else quantized
    weights = adapter_state_dict(out_dir) if weights is None else weights
    torch.manual_seed(cfg["seed"])  # a scratch base is rebuilt from the run's seed, as the loop built it
    base = build_base({**cfg, "dropout": 0.0}, run_dir.meta()["vocab_size"], "qlora" if quantized else "lora",
                      "fp32", "cpu", run_dir=out_dir)
    model = wrap_lora(base, lora_config(cfg, quantized=quantized))
    if quantized:
        use_dequantizing_matmul(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise UserError(f"the adapters in {out_dir} do not match its config.json (lora_r, lora_targets): "
                        f"missing {missing[:2]}, unexpected {unexpected[:2]}")
    return model.eval()


def load_run(out_dir, tag=None):
    """A training run's model from a checkpoint (`tag`, else the newest that verifies)."""
    run_dir = RunDir(out_dir)
    cfg, meta = run_dir.config(), run_dir.meta()
    if run_dir.mode() in ADAPTER_MODES:  # base rebuilt from the run's init_from, adapters from the checkpoint
        lm = load_adapter_run(out_dir, weights=adapter_state_dict(out_dir, tag))
        return LoadedModel(lm, load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], cfg)
    lm = model_from_config_file(run_dir.model_config_path)
    missing, unexpected = lm.load_state_dict(consolidated_state_dict(out_dir, tag), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, saved once
    if missing or unexpected:
        raise UserError(f"checkpoint in {out_dir} does not match its model_config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    lm.tie_weights()
    return LoadedModel(lm.eval(), load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], cfg)


def load_hf(source):
    lm = load_pretrained(source, dropout=0.0)
    meta_file = Path(source) / "meta.pkl"  # exports of character-level runs carry their vocabulary
    if meta_file.is_file():
        meta = RunDir(source).meta()
        return LoadedModel(lm.eval(), load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], None)
    return LoadedModel(lm.eval(), load_tokenizer({"tokenizer": "gpt2"}), lm.config.n_positions,
                       min(lm.config.vocab_size, 50257), None)


def load_for_inference(source):
    """`source`: a training run's out_dir, a Hugging Face model directory, or a GPT-2 hub name."""
    if RunDir(source).is_run():
        return load_run(source)
    if source in HUB_NAMES or (Path(source) / "config.json").is_file():
        return load_hf(source)
    raise UserError(f"{source} is not a training run (no config.json and model_config.json), "
                    f"a Hugging Face model directory, or one of {', '.join(HUB_NAMES)}")
