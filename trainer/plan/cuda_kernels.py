"""What a CUDA run does differently from a fake CPU tensor, as stand-ins for `--plan --simulate`.

- attention: CUDA runs causal text through flash SDPA (saves q, k, v, the output and an fp32
  log-sum-exp per row); a packed batch's boolean block mask goes to the memory-efficient kernel, which
  first turns it into an additive mask of the compute dtype. The CPU build would pick its own kernels
  (the math one for fake tensors), so scaled_dot_product_attention is replaced by stand-ins that
  allocate and save exactly what the CUDA kernels do.
- no causal mask is materialized: transformers skips it for SDPA unless it thinks it is tracing, and
  it takes FakeTensors for tracing; that check is told the truth here.
- dropout is CUDA's fused native_dropout, which keeps a boolean mask; on a CPU tensor F.dropout takes
  an unfused path that keeps a noise tensor of the compute dtype.
The swaps hold only inside `with cuda_kernels():`.
"""
import contextlib

import torch


class _FlashAttention(torch.autograd.Function):
    """CUDA flash SDPA (causal, no mask): output laid out (b, s, h, d), fp32 log-sum-exp (b, h, s)."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, s, d = q.shape
        out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(b, h, s, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return tuple(t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k, v))


class _EfficientAttention(torch.autograd.Function):
    """CUDA memory-efficient SDPA with an additive mask (what a boolean mask becomes): the mask is saved."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        b, h, s, d = q.shape
        out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(b, h, -(-s // 32) * 32, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        grads = tuple(t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k, v))
        return grads + (None,)


def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as CUDA dispatches GPT-2's calls (dropout only adds an RNG seed)."""
    del dropout_p, scale, enable_gqa
    if attn_mask is None:
        if not is_causal:
            raise RuntimeError("simulation: non-causal attention without a mask is not a GPT-2 training step")
        return _FlashAttention.apply(query, key, value)
    if attn_mask.dtype == torch.bool:  # sdpa's convert_boolean_attn_mask: a new additive mask in the compute dtype
        attn_mask = query.new_empty(attn_mask.shape)
    return _EfficientAttention.apply(query, key, value, attn_mask)


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as on CUDA: the fused native_dropout (output + a bool mask, which backward keeps).

    On a CPU tensor torch takes the unfused path instead (a noise tensor of the input's dtype, then a
    multiply that keeps it), which would count 2 bytes per element where CUDA keeps 1.
    """
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        return input.mul_(0) if inplace else input * 0
    out = torch.ops.aten.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


@contextlib.contextmanager
def cuda_kernels():
    """Swap in CUDA's attention and dropout and tell transformers' mask code what an eager CUDA run tells it;
    everything is put back on leaving, also when the step inside raises."""
    import transformers.masking_utils as masking
    from torch._subclasses.fake_tensor import FakeTensor
    saved_sdpa, saved_tracing = torch.nn.functional.scaled_dot_product_attention, masking.is_tracing
    saved_packed = masking.find_packed_sequence_indices

    def is_tracing(tensor=None):
        return False if isinstance(tensor, FakeTensor) else saved_tracing(tensor)

    saved_dropout = torch.nn.functional.dropout
    try:
        torch.nn.functional.scaled_dot_product_attention = cuda_sdpa
        torch.nn.functional.dropout = cuda_dropout
        masking.is_tracing = is_tracing
        # Unpacked batches: GPT-2 makes position_ids = arange, in which transformers finds no packed sequences
        # (one data-dependent test). Packed batches pass trainer/model/attention.py's explicit 4-D mask and
        # never get here.
        masking.find_packed_sequence_indices = lambda position_ids: None
        yield
    finally:
        masking.find_packed_sequence_indices = saved_packed
        torch.nn.functional.scaled_dot_product_attention = saved_sdpa
        torch.nn.functional.dropout = saved_dropout
        masking.is_tracing = saved_tracing
