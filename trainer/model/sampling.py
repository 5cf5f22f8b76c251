"""Autoregressive sampling from a GPT2LMHeadModel, nanoGPT's way (temperature, top-k)."""
import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(lm, idx, max_new_tokens, block_size, temperature=1.0, top_k=None, vocab_limit=None,
             stop_token=None, generator=None):
    """Extend idx (1 x T) by up to max_new_tokens tokens.

    Uses the KV cache while the context fits in block_size, then recomputes on the cropped
    context. vocab_limit masks the padding rows of a padded vocabulary; stop_token ends early.
    """
    past = None
    for _ in range(max_new_tokens):
        if idx.size(1) <= block_size:
            step_input = idx if past is None else idx[:, -1:]
            out = lm(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = lm(input_ids=idx[:, -block_size:], use_cache=False)
        logits = out.logits[:, -1, :].float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = -float("inf")
        if temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits[logits < kth] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_id.to(idx.device)), dim=1)
        if stop_token is not None and next_id.item() == stop_token:
            break
    return idx
