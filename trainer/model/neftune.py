"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while training,
uniform noise in [-1, 1] scaled by alpha / sqrt(L * d) is added to the input embeddings, where d is the
embedding width and L the length of the example the token belongs to.

In a packed instruction block (position_ids restart at 0 at each example) L is each example's own length
inside the block, not the block's: a short example packed beside long ones gets the noise it would get
alone. A row without position_ids (a text window) is one example of the row's length. The padding after
the last example counts as one more example (its tokens carry no loss).

Two hooks, registered only when neftune_alpha > 0 (off leaves no trace in the module): a forward pre-hook
on LMWithLoss reads the batch's token ids and position_ids and keeps the per-token scale; a forward hook on
the input embedding adds the noise to its output when the module is in training mode. Evaluation and
generation (eval mode) never see noise.
"""
import inspect

import torch


def example_lengths(position_ids, shape, device=None):
    """(batch, seq) lengths: each token's example length (position_ids restart at 0 where an example starts)."""
    b, s = shape
    if position_ids is None:
        return torch.full((b, s), s, dtype=torch.float32, device=device)
    # an example runs from its start (position 0) to the next start: each token's length is the distance
    # between the last start at or before it and the first start after it (static shapes: no bincount, so the
    # simulation's fake tensors go through it too)
    index = torch.arange(s, device=position_ids.device).expand(b, s)
    starts = position_ids == 0
    starts[:, 0] = True  # a row always starts an example
    last_start = torch.where(starts, index, 0).cummax(dim=1).values
    later = torch.where(starts, index, s)[:, 1:]
    after = torch.cat([later, torch.full((b, 1), s, device=later.device, dtype=later.dtype)], dim=1)
    next_start = after.flip(1).cummin(dim=1).values.flip(1)
    return (next_start - last_start).float()


def noise_scale(alpha, position_ids, shape, width, device=None):
    """(batch, seq, 1): alpha / sqrt(L * d) per token."""
    return (alpha / torch.sqrt(example_lengths(position_ids, shape, device) * width)).unsqueeze(-1)


def add_neftune(module, alpha):
    """Register NEFTune on an LMWithLoss (`module.lm` the GPT-2, a PeftModel around it for adapter modes)."""
    signature = inspect.signature(module.forward)  # the batch by name: forward(idx, targets, position_ids, ...)
    embedding = module.lm.get_input_embeddings()
    width = embedding.embedding_dim  # not weight.shape: ZeRO-3 partitions the weight
    state = {}

    def keep_scale(mod, args, kwargs):
        batch = signature.bind(*args, **kwargs).arguments
        idx, position_ids = batch["idx"], batch.get("position_ids")
        if mod.training:
            state["scale"] = noise_scale(alpha, position_ids, idx.shape, width, idx.device)

    def add_noise(mod, args, output):
        del args
        scale = state.pop("scale", None)
        if not mod.training or scale is None:
            return output
        noise = torch.empty_like(output).uniform_(-1, 1) * scale.to(output.dtype)
        return output + noise

    module.register_forward_pre_hook(keep_scale, with_kwargs=True)
    embedding.register_forward_hook(add_noise)
    return module
