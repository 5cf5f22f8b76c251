"""The model: transformers' GPT2LMHeadModel (SDPA attention) plus a memory-lean loss.

`build_model` makes the GPT-2 from scratch, from a hub name or from a local Hugging Face
directory; `LMWithLoss` is the module DeepSpeed trains: it returns the mean token loss,
computed over chunks of tokens so that full fp32 logits are never held at once.
"""
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.errors import UserError
# The planner counts the loss with the same chunk and pads a scratch vocabulary the same way.
from trainer.memory_model import GPT2_SHAPES, LOSS_CHUNK_BYTES, padded_vocab
from trainer.tokenizer import GPT2_EOT, IGNORE_INDEX

HUB_NAMES = tuple(GPT2_SHAPES)
# GPT-2's own activation, "gelu_new", is the tanh GELU written as five Python-level ops: autograd keeps
# four extra 4h-wide tensors per layer for it. torch's fused tanh GELU computes the same function in one
# kernel (max |difference| 4.8e-7 in fp32, at most one rounding step in bf16/fp16: tests/test_model.py),
# so every model the trainer builds uses it; saved and exported configs carry it (transformers knows it).
ACTIVATION = "gelu_pytorch_tanh"


def scratch_config(cfg, vocab_size):
    return GPT2Config(
        vocab_size=padded_vocab(vocab_size), n_positions=cfg["block_size"], n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], resid_pdrop=cfg["dropout"],
        embd_pdrop=cfg["dropout"], attn_pdrop=cfg["dropout"], use_cache=False, activation_function=ACTIVATION,
        # GPT-2's <|endoftext|> exists only in a GPT-2 vocabulary, not in a character one
        bos_token_id=GPT2_EOT if vocab_size > GPT2_EOT else None,
        eos_token_id=GPT2_EOT if vocab_size > GPT2_EOT else None,
    )


def load_pretrained(source, dropout, dtype=None, **kwargs):
    """GPT-2 from the hub or a local HF directory, with dropout overridden."""
    if source not in HUB_NAMES and not (Path(source) / "config.json").is_file():
        raise UserError(f"init_from={source!r} is neither scratch, resume, a GPT-2 hub name "
                        f"({', '.join(HUB_NAMES)}) nor a Hugging Face model directory with config.json")
    try:
        return GPT2LMHeadModel.from_pretrained(
            source, attn_implementation="sdpa", resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, use_cache=False, dtype=dtype, activation_function=ACTIVATION, **kwargs)
    except OSError as exc:
        raise UserError(f"could not load {source!r} ({str(exc).splitlines()[0]}); "
                        f"check the name or download it first with network access") from None


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


def build_model(cfg, vocab_size):
    """GPT2LMHeadModel for cfg['init_from'] (never 'resume': resume rebuilds from model_config.json)."""
    init_from = cfg["init_from"]
    if init_from == "scratch":
        model = GPT2LMHeadModel(scratch_config(cfg, vocab_size))
    else:
        model = load_pretrained(init_from, cfg["dropout"])
        crop_block_size(model, cfg["block_size"])
    if not cfg["bias"]:
        remove_biases(model)
    return model


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
    config = GPT2Config.from_json_file(path)
    config._attn_implementation = "sdpa"
    config.activation_function = ACTIVATION  # runs saved before the switch say gelu_new: the same function
    return GPT2LMHeadModel(config)


def _chunk_loss_sum(lm_head, hidden, targets):
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(lm_head, hidden, targets, chunk_bytes=LOSS_CHUNK_BYTES):
    """Mean cross-entropy over tokens whose target is not IGNORE_INDEX.

    Each chunk's logits are recomputed in the backward pass (checkpointed), so the peak is
    one chunk of fp32 logits instead of batch x block x vocab of them.
    """
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    vocab = lm_head.out_features if hasattr(lm_head, "out_features") else lm_head.weight.shape[0]
    chunk = max(1, chunk_bytes // (4 * vocab))
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if hidden.size(0) <= chunk:
        return _chunk_loss_sum(lm_head, hidden, targets) / n_valid
    total = hidden.new_zeros((), dtype=torch.float32)
    piece = functools.partial(_chunk_loss_sum, lm_head)
    for start in range(0, hidden.size(0), chunk):
        total = total + checkpoint(piece, hidden[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total / n_valid


def packed_causal_mask(position_ids):
    """Block-diagonal causal attention for packed examples, (B, T) positions -> (B, 1, T, T) bool.

    An example starts where its position is 0; a token attends (True) only to itself and the earlier
    tokens of its own example. transformers passes a 4-D mask to SDPA as it is.
    """
    example = (position_ids == 0).cumsum(-1)
    same = example.unsqueeze(-1) == example.unsqueeze(-2)
    T = position_ids.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal).unsqueeze(1)


# Packed instruction batches on GPUs: FlexAttention with a document mask instead of the dense mask, so the
# kernel skips the tiles between examples and no (B, 1, T, T) tensor exists. Registered with transformers
# under this name: a BlockMask goes to FlexAttention, anything else (plain text, evaluation) to SDPA.
PACKED_ATTENTION = "gpt2ds_packed"
_compiled_flex = None


def document_block_mask(position_ids):
    """FlexAttention's BlockMask for packed examples: causal within the example a token belongs to.

    The same rule as packed_causal_mask (an example starts where its position is 0), kept as
    (B, T/128, T/128) block indices instead of B x T x T booleans.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    example = (position_ids == 0).cumsum(-1)

    def same_example_causal(b, h, q, kv):
        return (example[b, q] == example[b, kv]) & (q >= kv)

    B, T = position_ids.shape
    return create_block_mask(same_example_causal, B, None, T, T, device=position_ids.device)


def flex_attention(query, key, value, block_mask, scale):
    """torch's FlexAttention: compiled on a GPU (its fast kernel), eager elsewhere (a reference implementation)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex
    if query.device.type != "cuda":
        return flex(query, key, value, block_mask=block_mask, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale)


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_block_mask=None,
                      **kwargs):
    """transformers' GPT-2 checks attention_mask.ndim, which a BlockMask lacks: it comes as a keyword instead."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if packed_block_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = flex_attention(query, key, value, packed_block_mask, scaling)  # attention dropout is off on this path
    return out.transpose(1, 2).contiguous(), None


def use_flex_for_packed(lm):
    """Packed batches through FlexAttention from now on (GPUs, attention dropout off); text keeps SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    if PACKED_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    lm.config._attn_implementation = PACKED_ATTENTION
    for module in lm.modules():
        if module is not lm and getattr(module, "config", None) is not None and hasattr(module.config,
                                                                                        "_attn_implementation"):
            module.config._attn_implementation = PACKED_ATTENTION


def packed_kernel(device_type, attn_dropout):
    """'flex' (FlexAttention, document mask) on GPUs without attention dropout; else 'dense_mask' (SDPA)."""
    return "flex" if device_type == "cuda" and attn_dropout == 0 else "dense_mask"


class LMWithLoss(nn.Module):
    """What DeepSpeed trains: tokens in, mean loss out (the HF model is `self.lm`).

    Packed instruction batches also pass position_ids (restarting at 0 at each example); they
    then get block-diagonal causal attention, so an example never sees the ones before it.
    """

    def __init__(self, lm, packed="dense_mask"):
        super().__init__()
        self.lm = lm
        self.packed = packed  # how packed batches keep examples apart (packed_kernel)
        if packed == "flex":
            use_flex_for_packed(lm)

    def forward(self, idx, targets, position_ids=None, attention_mask=None):
        extra = {}
        if position_ids is not None and attention_mask is None:
            if self.packed == "flex":  # the causal mask transformers makes is ignored by _packed_attention
                extra["packed_block_mask"] = document_block_mask(position_ids)
            else:
                attention_mask = packed_causal_mask(position_ids)
        hidden = self.lm.transformer(input_ids=idx, position_ids=position_ids, attention_mask=attention_mask,
                                     **extra).last_hidden_state
        if position_ids is not None:  # packed instruction data: logits only where the loss counts
            keep = targets != IGNORE_INDEX
            hidden, targets = hidden[keep], targets[keep]
        return chunked_lm_loss(self.lm.lm_head, hidden, targets)



def _weights_in(param):
    """Weights a parameter holds: bitsandbytes packs two 4-bit weights per byte (QLoRA)."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def count_parameters(model):
    total = sum(_weights_in(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
