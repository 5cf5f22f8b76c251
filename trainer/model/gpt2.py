"""GPT-2 as the trainer builds it: transformers' GPT2LMHeadModel with SDPA attention, from scratch, from a
hub name, a local Hugging Face directory or a nanoGPT checkpoint, or from a run's saved config; with the
few changes training needs (a cropped position table, frozen zero biases, gradient checkpointing)."""
import tempfile
import warnings

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from trainer.data.tokenizer import GPT2_EOT
from trainer.errors import UserError
from trainer.model import nanogpt
from trainer.model.model_files import RUN_FILE_FIX, check_file
from trainer.model.shapes import HUB_NAMES, Shape, model_dir_config, nanogpt_shape, padded_vocab
from trainer.os_errors import refusal_in

# GPT-2's own activation, "gelu_new", is the tanh GELU written as five Python-level ops: autograd keeps
# four extra 4h-wide tensors per layer for it. torch's fused tanh GELU computes the same function in one
# kernel (max |difference| 4.8e-7 in fp32, at most one rounding step in bf16/fp16: tests/test_model.py),
# so every model the trainer builds uses it instead of gelu_new; saved and exported configs carry it
# (transformers knows it). Any other activation is another function and is kept: nanoGPT's models use the
# exact GELU ("gelu").
ACTIVATION = "gelu_pytorch_tanh"
# The plan's dtype names
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def trained_activation(name):
    """The activation a model is built with: gelu_new becomes the same function in one kernel, others stay."""
    return ACTIVATION if name == "gelu_new" else name


def gpt2_config(shape, dropout, activation=ACTIVATION):
    """The GPT2Config of a shape as the trainer builds it: the fused GELU (unless another activation is
    asked for), dropout everywhere, no KV cache."""
    return GPT2Config(
        vocab_size=shape.vocab_size, n_positions=shape.block_size, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
        activation_function=activation,
        # GPT-2's <|endoftext|> exists only in a GPT-2 vocabulary, not in a character one
        bos_token_id=GPT2_EOT if shape.vocab_size > GPT2_EOT else None,
        eos_token_id=GPT2_EOT if shape.vocab_size > GPT2_EOT else None,
    )


def scratch_config(cfg, vocab_size):
    """A new GPT-2 of the config's shape for a dataset's vocabulary (padded, trainer/model/shapes.py)."""
    shape = Shape(cfg.n_layer, cfg.n_head, cfg.n_embd, padded_vocab(vocab_size), cfg.block_size)
    return gpt2_config(shape, cfg.dropout)


def load_pretrained(source, dropout, dtype=None, **kwargs):
    """GPT-2 from the hub, a local HF directory or a nanoGPT checkpoint, with dropout overridden.

    A folder of another architecture is refused before loading (model_dir_config), and a load that reports
    missing, unexpected or mis-shaped weights is an error: transformers would leave those weights random."""
    checkpoint = nanogpt.checkpoint_path(source)
    if checkpoint is not None:
        return gpt2_from_nanogpt(checkpoint, dropout, dtype, **kwargs)
    if source not in HUB_NAMES:
        model_dir_config(source)  # a GPT-2 folder with config.json, or one line saying what init_from may be
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of missing weights would bury the one line below
    try:
        activation = trained_activation(GPT2Config.from_pretrained(source).activation_function)
        model, info = GPT2LMHeadModel.from_pretrained(
            source, attn_implementation="sdpa", resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, use_cache=False, dtype=dtype, activation_function=activation,
            output_loading_info=True, **kwargs)
    except OSError as exc:
        if refusal_in(exc) is not None:  # permission, no space...: the OS's own line (trainer/cli.run_main)
            raise
        raise UserError(f"could not load {source!r} ({str(exc).splitlines()[0]}); "
                        f"check the name or download it first with network access") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    wrong = {kind: sorted(map(str, info.get(f"{kind}_keys") or ())) for kind in ("missing", "unexpected", "mismatched")}
    if any(wrong.values()):
        found = ", ".join(f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in wrong.items() if keys)
        raise UserError(f"the weights in {source} are not a GPT-2's of its config.json: {found}; loading them "
                        f"would leave weights random: use a folder saved by GPT2LMHeadModel.save_pretrained")
    return model


def gpt2_from_nanogpt(path, dropout, dtype=None, **kwargs):
    """A nanoGPT checkpoint as GPT2LMHeadModel, its architecture kept exactly (trainer/model/nanogpt.py):
    the exact GELU, its vocabulary and positions, zero biases where it had none. A 4-bit load (kwargs: a
    quantization_config) goes through from_pretrained, from the model saved to a temporary folder."""
    args = nanogpt.model_args(path)
    config = gpt2_config(nanogpt_shape(path, args["block_size"]), dropout, activation=nanogpt.ACTIVATION)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(nanogpt.hf_state_dict(path), strict=False)
    expected = {"lm_head.weight"} | ({n for n, _ in model.named_parameters() if n.endswith(".bias")}
                                     if not args["bias"] else set())
    if set(missing) - expected or unexpected:
        raise UserError(f"{path} does not hold nanoGPT's GPT of its model_args (missing "
                        f"{sorted(set(missing) - expected)[:3]}, unexpected {unexpected[:3]}); was it saved by "
                        f"another model?")
    model.tie_weights()
    if not args["bias"]:
        remove_biases(model)
    if not kwargs:
        return model.to(dtype) if dtype is not None else model
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as folder:
        model.save_pretrained(folder)
        del model
        return GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa", use_cache=False, dtype=dtype,
                                               **kwargs)


def crop_block_size(model, block_size):
    """Keep the first block_size positions of a pretrained position table."""
    n_positions = model.config.n_positions
    if block_size > n_positions:
        raise UserError(f"block_size={block_size} is larger than the model's {n_positions} positions; "
                        f"use --block_size={n_positions} or less")
    if block_size < n_positions:
        wpe = model.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight.data[:block_size].clone())
        wpe.num_embeddings = block_size
        model.config.n_positions = block_size


def remove_biases(model):
    """bias=False (nanoGPT's option): HF GPT-2 always has biases, so zero and freeze them."""
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.data.zero_()
            param.requires_grad_(False)


def fit_to_config(model, cfg):
    """What the config changes in any GPT-2 it trains: the position table cropped to block_size, and with
    bias=False the biases zeroed and frozen."""
    crop_block_size(model, cfg.block_size)
    if not cfg.bias:
        remove_biases(model)
    return model


def build_model(cfg, vocab_size):
    """GPT2LMHeadModel for cfg.init_from (never 'resume': resume rebuilds from model_config.json)."""
    init_from = cfg.init_from
    if init_from == "scratch":
        model = GPT2LMHeadModel(scratch_config(cfg, vocab_size))
    else:
        model = load_pretrained(init_from, cfg.dropout)
    return fit_to_config(model, cfg)


def enable_checkpointing(lm, frozen_inputs=False):
    """Hugging Face's gradient checkpointing, non-reentrant (the one way the trainer turns it on).

    frozen_inputs: the embeddings are frozen (LoRA/QLoRA on an already wrapped model), so the
    checkpointed blocks' inputs must be made to require grad for the adapters inside to get one.
    """
    with warnings.catch_warnings():  # transformers 5 renames it activation checkpointing (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if frozen_inputs:
        lm.enable_input_require_grads()


def model_from_config_file(path):
    """Rebuild the architecture saved at the start of a run (weights come from the checkpoint)."""
    check_file(path, RUN_FILE_FIX)
    config = GPT2Config.from_json_file(path)
    config._attn_implementation = "sdpa"
    config.activation_function = trained_activation(config.activation_function)  # older runs say gelu_new
    return GPT2LMHeadModel(config)


def _weights_in(param):
    """Weights a parameter holds: bitsandbytes packs two 4-bit weights per byte (QLoRA)."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def count_parameters(model):
    total = sum(_weights_in(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
