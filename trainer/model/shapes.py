"""GPT-2's shapes and what follows from them, arithmetic only (no torch): the published sizes, parameter
and tensor counts, LoRA's additions, the loss chunk, and reading a model's shape without building it.

The planner (trainer/plan/) and the model code share these, so each count is written once.
"""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.model import nanogpt
from trainer.model.model_files import RUN_FILE_FIX, check_file, check_model_files
from trainer.units import MiB

# (n_layer, n_head, n_embd) of the published GPT-2 sizes; all have vocab 50257 and 1024 positions.
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}
HUB_NAMES = tuple(GPT2_SHAPES)
GPT2_VOCAB = 50257
GPT2_POSITIONS = 1024

# The loss is computed over chunks of the flattened tokens so that one chunk's fp32 logits stay under this
# many bytes (trainer/model/loss.py); the memory model counts the same chunk.
LOSS_CHUNK_BYTES = 256 * MiB


@dataclass(frozen=True)
class Shape:
    """What the memory of a GPT-2 depends on: its size and the length of the sequences it trains on."""
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int


def padded_vocab(vocab_size, multiple=64):
    """A scratch model's vocabulary, rounded up: matmuls with a multiple of 64 run faster (nanoGPT's 50304)."""
    return (vocab_size + multiple - 1) // multiple * multiple


def gpt2_param_count(n_layer, n_head, n_embd, vocab_size, block_size):
    """Parameters of GPT-2 with tied input/output embeddings and biases everywhere.

    Per block: ln_1, ln_2 (2C each), c_attn C->3C, attn c_proj C->C, c_fc C->4C,
    mlp c_proj 4C->C, each with a bias: 12C^2 + 13C. Plus wte, wpe and ln_f.
    """
    del n_head  # heads split C; they add no parameters
    c = n_embd
    return vocab_size * c + block_size * c + n_layer * (12 * c * c + 13 * c) + 2 * c


@functools.cache  # the planner asks for every candidate: a tuple, made once per shape
def gpt2_named_shapes(n_layer, n_embd, vocab_size, block_size):
    """(name, shape) of every parameter tensor of HF's GPT2LMHeadModel (lm_head tied to wte), in the model's
    order. Its projections are Conv1D: weights are (in, out), the transpose of nn.Linear's."""
    c = n_embd
    block = [("ln_1.weight", (c,)), ("ln_1.bias", (c,)), ("attn.c_attn.weight", (c, 3 * c)),
             ("attn.c_attn.bias", (3 * c,)), ("attn.c_proj.weight", (c, c)), ("attn.c_proj.bias", (c,)),
             ("ln_2.weight", (c,)), ("ln_2.bias", (c,)), ("mlp.c_fc.weight", (c, 4 * c)), ("mlp.c_fc.bias", (4 * c,)),
             ("mlp.c_proj.weight", (4 * c, c)), ("mlp.c_proj.bias", (c,))]
    return tuple([("transformer.wte.weight", (vocab_size, c)), ("transformer.wpe.weight", (block_size, c))]
                 + [(f"transformer.h.{i}.{name}", shape) for i in range(n_layer) for name, shape in block]
                 + [("transformer.ln_f.weight", (c,)), ("transformer.ln_f.bias", (c,))])


@functools.cache
def _gpt2_tensors(n_layer, n_embd, vocab_size, block_size):
    return tuple((math.prod(shape), len(shape) == 2)
                 for _, shape in gpt2_named_shapes(n_layer, n_embd, vocab_size, block_size))


def gpt2_tensors(n_layer, n_embd, vocab_size, block_size):
    """(element count, is a matrix) of every parameter tensor of HF's GPT2LMHeadModel (lm_head tied to wte),
    in the model's order. Matrices are what AdamW decays (trainer/optim/optimizer.param_groups)."""
    return list(_gpt2_tensors(n_layer, n_embd, vocab_size, block_size))


def gpt2_tensor_numels(n_layer, n_embd, vocab_size, block_size):
    """Element counts of every parameter tensor of HF's GPT2LMHeadModel (lm_head tied to wte).

    Sums to gpt2_param_count; ZeRO-3 needs the single tensors (which stay whole on every rank).
    """
    return [n for n, _ in _gpt2_tensors(n_layer, n_embd, vocab_size, block_size)]


def lora_projections(n_embd):
    """(in, out) of the projections each LoRA target names in one block; `c_proj` names both the attention
    output (C->C) and the MLP output (4C->C)."""
    c = n_embd
    return {"c_attn": [(c, 3 * c)], "c_proj": [(c, c), (4 * c, c)], "c_fc": [(c, 4 * c)]}


def lora_tensor_numels(n_layer, n_embd, r, targets, dora=False):
    """Element counts of the LoRA A and B matrices (in x r and r x out per targeted projection); with DoRA
    also each projection's magnitude vector (out)."""
    projections = lora_projections(n_embd)
    unknown = set(targets) - set(projections)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(projections)}")
    per_layer = [n for t in set(targets) for i, o in projections[t] for n in (i * r, r * o)]
    if dora:
        per_layer += [o for t in set(targets) for _, o in projections[t]]
    return per_layer * n_layer


def lora_group_numels(n_layer, n_embd, r, targets, dora=False, loraplus=False):
    """Elements per optimizer group of an adapter run, in trainer/optim/optimizer.param_groups' order: the
    2-D matrices (A only under LoRA+), LoRA+'s B matrices, DoRA's magnitudes (1-D: not decayed)."""
    projections = lora_projections(n_embd)
    a = sum(i * r for t in set(targets) for i, _ in projections[t]) * n_layer
    b = sum(r * o for t in set(targets) for _, o in projections[t]) * n_layer
    groups = [a, b] if loraplus else [a + b]
    if dora:
        groups.append(sum(o for t in set(targets) for _, o in projections[t]) * n_layer)
    return groups


def linear_weight_count(n_layer, n_embd):
    """Weights of the four projections per block (what QLoRA quantizes to 4 bits)."""
    return n_layer * 12 * n_embd * n_embd


def lora_trainable_count(n_layer, n_embd, r, targets, dora=False):
    """LoRA adds A (in x r) and B (r x out) to each targeted projection: r * (in + out) (DoRA: + out)."""
    return sum(lora_tensor_numels(n_layer, n_embd, r, targets, dora))


def flops_per_token(n_params, n_layer, n_head, n_embd, block_size, mode="full", n_trainable=None):
    """Training FLOPs per token (MFU's numerator: recomputation for checkpointing is not counted).

    Attention (PaLM appendix B): 12 * n_layer * n_embd * block_size, forward and both input gradients.
    full: 6N (forward 2N, input gradients 2N, weight gradients 2N).
    lora/qlora: the frozen base does the forward and the input-gradient matmuls but no weight gradients,
    4 * N_base, plus 6 * N_adapters for the adapters.
    """
    del n_head  # attention FLOPs depend on n_embd = n_head * head_dim only
    attention = 12 * n_layer * n_embd * block_size
    if mode == "full":
        return 6 * n_params + attention
    adapters = n_trainable or 0
    return 4 * (n_params - adapters) + 6 * adapters + attention


def recompute_flops_per_token(n_layer, n_embd, block_size):
    """FLOPs per token that gradient checkpointing computes again in the backward pass: the blocks' forward
    (2 per weight of their four projections, 12 h^2 per layer, and attention's forward third), not the
    embeddings and head, which are outside the checkpointed blocks (measured on the CPU: 1.22x the passes of
    GPT-2 124M, as this count says; bench/step_costs.py)."""
    return 2 * 12 * n_layer * n_embd ** 2 + 4 * n_layer * n_embd * block_size



def model_dir_config(source):
    """config.json of a local model folder named by init_from, checked to be a GPT-2's, or one line saying
    what init_from may be. Another architecture (a BERT saved by save_pretrained) is refused here, before
    any weights are read: transformers would load it into a GPT-2 with random weights."""
    path = Path(source) / "config.json"
    if not path.is_file():
        raise UserError(f"init_from={source!r} is neither scratch, resume, a GPT-2 hub name "
                        f"({', '.join(HUB_NAMES)}), a Hugging Face model directory with config.json, a training "
                        f"run's out_dir nor a nanoGPT out_dir or ckpt.pt")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; save the model again with save_pretrained") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gpt2":
        raise UserError(f"{source} holds a {model_type or 'untyped'} model (config.json model_type "
                        f"{model_type!r}), not a GPT-2; use a GPT-2 folder (model_type 'gpt2') or one of "
                        f"{', '.join(HUB_NAMES)}")
    # safetensors reports an unreadable file as a missing one, and a cut-short one in a traceback: each read here
    check_model_files(path.parent)
    return path


def check_model_folder(init_from):
    """A local model folder named by init_from is a GPT-2's (hub names, scratch and resume need no check, nor a
    nanoGPT checkpoint or a training run's out_dir: its model_config.json, trainer/run/run_dir.py)."""
    if init_from in ("scratch", "resume", *HUB_NAMES) or nanogpt.checkpoint_path(init_from) is not None:
        return
    if not (Path(init_from) / "model_config.json").is_file():
        model_dir_config(init_from)


def nanogpt_shape(path, block_size):
    """The shape of a nanoGPT checkpoint's model (its model_args), trained on blocks of block_size."""
    args = nanogpt.model_args(path)
    return Shape(args["n_layer"], args["n_head"], args["n_embd"], args["vocab_size"], block_size)


def model_shape(cfg, data_vocab_size, model_config_path=None) -> "Shape":
    """The model's shape for the planner, without building the model or reading weights.

    A hub name has GPT-2's published shape; a local Hugging Face directory (or, on resume, the
    run's model_config.json) is read as JSON; a nanoGPT checkpoint has its model_args; a scratch model
    pads the data's vocabulary as trainer/model/gpt2.py does. Only json is needed (a nanoGPT checkpoint
    needs torch to read), so `--plan` stays fast.
    """
    init_from = cfg.init_from
    checkpoint = nanogpt.checkpoint_path(init_from) if model_config_path is None else None
    if checkpoint is not None:  # reading its model_args imports torch
        return nanogpt_shape(checkpoint, cfg.block_size)
    if model_config_path is not None or (init_from not in GPT2_SHAPES and init_from != "scratch"):
        if model_config_path is not None:
            check_file(model_config_path, RUN_FILE_FIX)
        hf = json.loads(Path(model_config_path or model_dir_config(init_from)).read_text())
        return Shape(hf["n_layer"], hf["n_head"], hf["n_embd"], hf["vocab_size"], cfg.block_size)
    if init_from in GPT2_SHAPES:
        n_layer, n_head, n_embd = GPT2_SHAPES[init_from]
        return Shape(n_layer, n_head, n_embd, GPT2_VOCAB, cfg.block_size)
    return Shape(cfg.n_layer, cfg.n_head, cfg.n_embd, padded_vocab(data_vocab_size), cfg.block_size)
