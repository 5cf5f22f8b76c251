"""What DeepSpeed trains: LMWithLoss, tokens in and the mean token loss out, computed in chunks so that the
full fp32 logits (batch x block x vocab) never exist at once."""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.data.tokenizer import IGNORE_INDEX
from trainer.model.attention import document_block_mask, packed_causal_mask, use_flex_for_packed
from trainer.model.offload import ActivationOffload
from trainer.model.shapes import LOSS_CHUNK_BYTES


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


def token_weight(micro_tokens, iteration_tokens, micro_batches):
    """The factor on a micro-batch's mean loss that makes every loss token of the iteration count alike.

    DeepSpeed divides each micro-batch's loss by the accumulation steps (engine.backward) and averages the
    gradients over the ranks (ZeRO 0-3, the 16-bit optimizers alike), so an iteration's update is the plain
    mean of its `micro_batches` (accumulation steps x ranks) micro-batch means. With response-only masks
    those hold different numbers of loss tokens; weighting each mean by micro_tokens x micro_batches /
    iteration_tokens makes the update sum(token losses) / iteration_tokens, however the iteration is split.
    Where every micro-batch holds the same number (pretraining) the weight is exactly 1.0 (integers divided).
    """
    return micro_tokens * micro_batches / max(iteration_tokens, 1)


def token_weighted(loss, micro_tokens, iteration_tokens, micro_batches):
    """A micro-batch's mean loss times its token_weight; a weight of 1.0 hands back `loss` itself, so
    pretraining keeps today's arithmetic bit for bit."""
    weight = token_weight(micro_tokens, iteration_tokens, micro_batches)
    return loss if weight == 1.0 else loss * weight


class LMWithLoss(nn.Module):
    """What DeepSpeed trains: tokens in, mean loss out (the HF model is `self.lm`).

    Packed instruction batches also pass position_ids (restarting at 0 at each example); they
    then get block-diagonal causal attention, so an example never sees the ones before it.
    """

    def __init__(self, lm, packed="dense_mask", activation_offload=False):
        super().__init__()
        self.lm = lm
        self.packed = packed  # how packed batches keep examples apart (packed_kernel)
        if packed == "flex":
            use_flex_for_packed(lm)
        self.offload = None
        self.set_activation_offload(activation_offload)

    def set_activation_offload(self, on):
        """Keep the activations the forward pass saves in CPU memory (trainer/model/offload.py), or not."""
        self.offload = ActivationOffload() if on else None

    def forward(self, idx, targets, position_ids=None, attention_mask=None):
        with self.offload or contextlib.nullcontext():
            return self.loss(idx, targets, position_ids, attention_mask)

    def loss(self, idx, targets, position_ids=None, attention_mask=None):
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
