"""Load a trained model for sampling, evaluation and export: a run's out_dir, an HF directory, or a hub name."""
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters import load_adapter_run, run_mode
from trainer.checkpoint import consolidated_state_dict
from trainer.config import ADAPTER_MODES
from trainer.errors import UserError
from trainer.model import HUB_NAMES, load_pretrained, model_from_config_file
from trainer.tokenizer import load_tokenizer


@dataclass
class LoadedModel:
    lm: torch.nn.Module  # a GPT2LMHeadModel (or a PeftModel around one)
    tokenizer: object
    block_size: int
    vocab_limit: int  # rows past this are vocabulary padding, never sampled
    run_config: dict | None  # the resolved config of a training run, None for HF models


def is_run_dir(path):
    return (Path(path) / "config.json").is_file() and (Path(path) / "model_config.json").is_file()


def load_run(out_dir):
    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    with open(out_dir / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    if run_mode(out_dir) in ADAPTER_MODES:  # base rebuilt from the run's init_from, adapters from the checkpoint
        lm = load_adapter_run(out_dir)
        return LoadedModel(lm, load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], cfg)
    lm = model_from_config_file(out_dir / "model_config.json")
    missing, unexpected = lm.load_state_dict(consolidated_state_dict(out_dir), strict=False)
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
        with open(meta_file, "rb") as f:
            meta = pickle.load(f)
        return LoadedModel(lm.eval(), load_tokenizer(meta), lm.config.n_positions, meta["vocab_size"], None)
    return LoadedModel(lm.eval(), load_tokenizer({"tokenizer": "gpt2"}), lm.config.n_positions,
                       min(lm.config.vocab_size, 50257), None)


def load_for_inference(source):
    """`source`: a training run's out_dir, a Hugging Face model directory, or a GPT-2 hub name."""
    if is_run_dir(source):
        return load_run(source)
    if source in HUB_NAMES or (Path(source) / "config.json").is_file():
        return load_hf(source)
    raise UserError(f"{source} is not a training run (no config.json and model_config.json), "
                    f"a Hugging Face model directory, or one of {', '.join(HUB_NAMES)}")
