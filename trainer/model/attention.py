"""Attention for packed instruction batches: each example attends only to itself.

An example starts where its position is 0. On the CPU (and with attention dropout) a dense block-diagonal
causal mask goes to SDPA; on GPUs FlexAttention with a document mask skips the tiles between examples.
Plain text never comes here: it keeps SDPA's causal kernel (flash on GPUs).
"""
import torch


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
