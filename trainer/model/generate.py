"""Batched decoding on the KV cache: answers to many prompts at once, greedy or sampled.

The prompts of a batch are left-padded to one length with an attention mask (padding is never attended
to), each row's positions count from its own first token (as if it were alone), and a row is done at its
stop token (end-of-text); the batch ends when every row is done or the position table is full. Each
token is chosen by sampling.next_token, the rule launch/sample.py uses too. The prompts are decoded
longest first, so a batch holds prompts of about one length (little padding).

On several ranks under ZeRO-3 every forward pass is collective: every rank answers the same prompts, and
`all_done` (given by the training loop) makes every rank stop a batch at the same step.
"""
import torch

from trainer.model.sampling import next_token


@torch.no_grad()
def generate_batch(lm, prompts, max_new_tokens, stop_token, temperature=0.0, top_k=None, vocab_limit=None,
                   generator=None, all_done=None):
    """New tokens for each prompt (lists of ids), without the stop token; at most max_new_tokens each.

    The caller keeps len(prompt) + max_new_tokens - 1 within the model's positions (generate_answers does).
    all_done(done) -> bool: whether to stop, given this rank's (B,) done flags (default: all of them done).
    """
    device = next(lm.parameters()).device
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), stop_token, dtype=torch.long)  # the padding's ids are never attended to
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    ones = torch.ones((rows, 1), dtype=torch.long, device=device)
    all_done = all_done or (lambda flags: bool(flags.all()))
    past, new = None, []
    for _ in range(max_new_tokens):
        out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True,
                 logits_to_keep=1)  # the last position's logits only, not the whole prompt's
        past = out.past_key_values
        ids = next_token(out.logits[:, -1, :], temperature, top_k, vocab_limit, generator).to(device)
        ids = ids.masked_fill(done[:, None], stop_token)  # a finished row only repeats its stop token
        new.append(ids)
        done |= ids[:, 0] == stop_token
        if all_done(done):
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, ones], dim=1)
    tokens = torch.cat(new, dim=1).tolist()  # one copy to the host
    return [row[:row.index(stop_token)] if stop_token in row else row for row in tokens]


def answer_budget(reference_lengths):
    """New tokens an answer may take when the user sets none: twice the longest reference (in tokens) and 16
    more; an answer that long is wrong anyway, and a model that never says end-of-text stops there."""
    return 2 * max(reference_lengths, default=0) + 16


def generate_answers(lm, prompts, block_size, max_new_tokens, stop_token, batch_size=16, temperature=0.0,
                     top_k=None, vocab_limit=None, generator=None, all_done=None, progress=None):
    """The new tokens for every prompt, in order, decoded batch_size prompts at a time, longest first.

    A prompt longer than block_size keeps its last block_size tokens; a batch's answers end where the
    position table does (block_size - its longest prompt + 1 tokens). progress(done, total) after each batch.
    """
    prompts = [list(p[-block_size:]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = len(prompts[batch[0]])
        out = generate_batch(lm, [prompts[i] for i in batch], min(max_new_tokens, block_size - longest + 1),
                             stop_token, temperature, top_k, vocab_limit, generator, all_done)
        for i, tokens in zip(batch, out):
            answers[i] = tokens
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return answers
