"""Load a trained model for sampling, evaluation and export: a run's out_dir, an HF directory, a hub name,
or a nanoGPT out_dir (or its ckpt.pt).

A full run is rebuilt from its saved architecture and the latest checkpoint's consolidated weights; an
adapter run (LoRA/QLoRA) from its original base (init_from) and the adapters in its checkpoint
(trainer/run/weights.py); a nanoGPT checkpoint as transformers' GPT-2 with nanoGPT's architecture
(trainer/model/nanogpt.py), its characters from its dataset's meta.pkl.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.config import ADAPTER_MODES
from trainer.data.meta import has_meta
from trainer.data.tokenizer import CharTokenizer, Gpt2Tokenizer, load_tokenizer
from trainer.errors import UserError
from trainer.model import nanogpt
from trainer.model.adapters import build_base
from trainer.model.gpt2 import load_pretrained, model_from_config_file
from trainer.model.shapes import HUB_NAMES
from trainer.run.consolidate import consolidated_state_dict
from trainer.run.run_dir import RunDir
from trainer.run.weights import adapter_state_dict, load_adapter_run


@dataclass
class LoadedModel:
    lm: torch.nn.Module  # a GPT2LMHeadModel (or a PeftModel around one)
    tokenizer: Gpt2Tokenizer | CharTokenizer
    block_size: int
    vocab_limit: int  # rows past this are vocabulary padding, never sampled
    run_config: dict | None  # the resolved config of a training run, None for HF models
    template: str | None = None  # the prompt template of a run trained on instruction data (its meta.pkl)


def dequantized_base(out_dir):
    """A QLoRA run's base exactly as it trained, unquantized: GPT-2 (Conv1D layers) with each 4-bit weight
    replaced by bitsandbytes' dequantize_4bit of it (the nf4 values times their scales, in fp32), everything
    else (embeddings, LayerNorms, biases) as loaded."""
    import bitsandbytes as bnb
    run_dir = RunDir(out_dir)
    cfg, vocab = replace(run_dir.config(), dropout=0.0), run_dir.meta()["vocab_size"]
    quantized = build_base(cfg, vocab, "qlora", "fp32", "cpu", run_dir=out_dir)
    base = build_base(cfg, vocab, "lora", "fp32", "cpu", run_dir=out_dir)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)  # (out, in)
            base.get_submodule(name).weight.data.copy_(weight.t().float())  # Conv1D keeps (in, out)
    return base


def load_run(out_dir, tag=None):
    """A training run's model from a checkpoint (`tag`, else the newest that verifies)."""
    run_dir = RunDir(out_dir)
    cfg, meta = run_dir.config(), run_dir.meta()
    if run_dir.mode() in ADAPTER_MODES:  # base rebuilt from the run's init_from, adapters from the checkpoint
        lm = load_adapter_run(out_dir, weights=adapter_state_dict(out_dir, tag))
        return LoadedModel(lm, load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], cfg.to_dict(),
                           meta.get("template"))
    lm = model_from_config_file(run_dir.model_config_path)
    missing, unexpected = lm.load_state_dict(consolidated_state_dict(out_dir, tag), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, saved once
    if missing or unexpected:
        raise UserError(f"checkpoint in {out_dir} does not match its model_config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    lm.tie_weights()
    return LoadedModel(lm.eval(), load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], cfg.to_dict(),
                       meta.get("template"))


def load_hf(source):
    lm = load_pretrained(source, dropout=0.0)
    if has_meta(source):  # exports of character-level runs carry their vocabulary
        meta = RunDir(source).meta()
        return LoadedModel(lm.eval(), load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], None)
    return LoadedModel(lm.eval(), load_tokenizer({"tokenizer": "gpt2"}), lm.config.n_positions,
                       min(lm.config.vocab_size, 50257), None)


def load_nanogpt(path):
    """A nanoGPT checkpoint; its run_config is nanoGPT's config (its dataset), with the data_dir where the
    dataset's meta.pkl was found."""
    lm = load_pretrained(str(path), dropout=0.0)
    meta, folder = nanogpt.find_meta(path)
    config = nanogpt.read_checkpoint(path).get("config")
    run_config = {**(config if isinstance(config, dict) else {}),
                  "data_dir": str(folder.parent) if folder is not None and folder != path.parent else "data"}
    return LoadedModel(lm.eval(), load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], run_config)


def load_for_inference(source):
    """`source`: a training run's out_dir, a Hugging Face model directory, a GPT-2 hub name, or a nanoGPT
    out_dir or ckpt.pt."""
    if RunDir(source).is_run():
        return load_run(source)
    checkpoint = nanogpt.checkpoint_path(source)
    if checkpoint is not None:
        return load_nanogpt(checkpoint)
    if source in HUB_NAMES or (Path(source) / "config.json").is_file():
        return load_hf(source)
    raise UserError(f"{source} is not a training run (no config.json and model_config.json), "
                    f"a Hugging Face model directory, a nanoGPT out_dir (no ckpt.pt), or one of {', '.join(HUB_NAMES)}")
