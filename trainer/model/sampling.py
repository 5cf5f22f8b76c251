"""Autoregressive sampling from a GPT2LMHeadModel, nanoGPT's way (temperature, top-k).

next_token is the one rule for choosing a token, used here and by the batched decoding of answers
(trainer/model/generate.py).
"""
import torch
import torch.nn.functional as F


def next_token(logits, temperature=1.0, top_k=None, vocab_limit=None, generator=None):
    """(B, vocab) logits -> (B, 1) token ids: the most likely at temperature 0, else sampled from the top_k.

    vocab_limit masks the padding rows of a padded vocabulary.
    """
    logits = logits.float()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -float("inf")
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits[logits < kth] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate(lm, idx, max_new_tokens, block_size, temperature=1.0, top_k=None, vocab_limit=None,
             stop_token=None, generator=None):
    """Extend idx (1 x T) by up to max_new_tokens tokens.

    Uses the KV cache while the context fits in block_size, then recomputes on the cropped
    context. stop_token ends early.
    """
    past = None
    for _ in range(max_new_tokens):
        if idx.size(1) <= block_size:
            step_input = idx if past is None else idx[:, -1:]
            out = lm(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = lm(input_ids=idx[:, -block_size:], use_cache=False)
        next_id = next_token(out.logits[:, -1, :], temperature, top_k, vocab_limit, generator)
        idx = torch.cat((idx, next_id.to(idx.device)), dim=1)
        if stop_token is not None and next_id.item() == stop_token:
            break
    return idx
