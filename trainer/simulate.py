"""`--plan --simulate`: run the plan's exact training step on fake tensors and count its memory.

The memory model (trainer/memory_model.py) is arithmetic; this module checks it against the step the
trainer really runs, at the real shapes, without weights, data or a GPU: this project's own module
(trainer/model.LMWithLoss with the chunked loss; transformers' gradient checkpointing; LoRA/QLoRA
adapters applied by trainer/adapters.apply_mode; packed instruction batches with their block-diagonal
mask when the dataset is packed), the plan's micro-batch, block size and dtype, forward, backward and
the optimizer step DeepSpeed runs, all on torch's FakeTensorMode (CPU fake tensors: a CPU-only torch
cannot run autograd on fake CUDA tensors), counted by torch.distributed._tools.mem_tracker.MemTracker.

What a CUDA run does differently from a fake CPU tensor, made explicit here:
- attention: CUDA runs causal text through flash SDPA (saves q, k, v, the output and an fp32
  log-sum-exp per row); a packed batch's boolean block mask goes to the memory-efficient kernel, which
  first turns it into an additive mask of the compute dtype. The CPU build would pick its own kernels
  (the math one for fake tensors), so scaled_dot_product_attention is replaced by stand-ins that
  allocate and save exactly what the CUDA kernels do.
- no causal mask is materialized: transformers skips it for SDPA unless it thinks it is tracing, and
  it takes FakeTensors for tracing; that check is told the truth here.
- dropout is CUDA's fused native_dropout, which keeps a boolean mask; on a CPU tensor F.dropout takes
  an unfused path that keeps a noise tensor of the compute dtype.
- the optimizer step is DeepSpeed's for the plan (torch AdamW, `torch_adam: true`, foreach as on
  CUDA): ZeRO-0 in 16 bits is DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py,
  step(): an fp32 copy of every gradient next to the fp32 master weights, then AdamW on the masters);
  ZeRO 1-3 step on a flat fp32 partition of the gradients; offload steps on the CPU (nothing on the GPU).
  bf16 at ZeRO-0 without offload on a GPU takes the fast path (trainer/engine.fast_bf16_path): DeepSpeed's
  BF16_Optimizer around torch's fused AdamW (_Bf16Step: the fp32 gradient buffer, the fp32 master
  partition, the bf16 -> fp32 accumulation after backward, the all-reduce's copies, the fused step).

It cannot see what is not a tensor of the step: the caching allocator's fragmentation, the CUDA
context, cuBLAS and flash-attention workspaces, NCCL buffers, and DeepSpeed's own buffers (gradient
buckets, ZeRO-3's gathered parameters) that live outside the module. The memory model covers those
with its `context_and_fragmentation` item (FRAGMENTATION, CUDA_CONTEXT_BYTES), `ds_buckets` and ZeRO-3's
in-flight weights, counted from DeepSpeed's code and checked against real engines on the CPU
(tests/test_engine_states.py). Model states (weights, gradients, optimizer states) are reported for
one rank at ZeRO-0, where the simulation holds them exactly as the engine does.
"""
import contextlib
import dataclasses

import torch
from torch import nn

from trainer.memory_model import GiB, MiB

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- CUDA's attention kernels

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
    """Swap in CUDA's attention and tell transformers' mask code what an eager CUDA run tells it."""
    import transformers.masking_utils as masking
    from torch._subclasses.fake_tensor import FakeTensor
    saved_sdpa, saved_tracing = torch.nn.functional.scaled_dot_product_attention, masking.is_tracing
    saved_packed = masking.find_packed_sequence_indices

    def is_tracing(tensor=None):
        return False if isinstance(tensor, FakeTensor) else saved_tracing(tensor)

    saved_dropout = torch.nn.functional.dropout
    torch.nn.functional.scaled_dot_product_attention = cuda_sdpa
    torch.nn.functional.dropout = cuda_dropout
    masking.is_tracing = is_tracing
    # Unpacked batches: GPT-2 makes position_ids = arange, in which transformers finds no packed sequences
    # (one data-dependent test). Packed batches pass trainer.model's explicit 4-D mask and never get here.
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = saved_packed
        torch.nn.functional.scaled_dot_product_attention = saved_sdpa
        torch.nn.functional.dropout = saved_dropout
        masking.is_tracing = saved_tracing


# ----------------------------------------------------------------------------- the module as trained

def _gpt2(shape, cfg, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.model import ACTIVATION
    config = GPT2Config(vocab_size=shape["vocab_size"], n_positions=cfg["block_size"], n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=cfg["dropout"],
                        embd_pdrop=cfg["dropout"], attn_pdrop=cfg["dropout"], use_cache=False,
                        activation_function=ACTIVATION)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel._from_config(config, dtype=dtype)


def _quantizable(lm, dtype):
    """QLoRA's base as transformers loads it (integrations/bitsandbytes.replace_with_bnb_linear): every
    block's Conv1D becomes a bitsandbytes Linear4bit (nf4, double quantization). Built on the meta
    device; _to_fake quantizes the weights with bitsandbytes' own ops (their fake kernels)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D
    for module in list(lm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                fan_in, fan_out = child.weight.shape
                layer = bnb.nn.Linear4bit(fan_in, fan_out, bias=True, compute_dtype=dtype, compress_statistics=True,
                                          quant_type="nf4", device="meta")
                layer.bias = nn.Parameter(torch.empty(fan_out, dtype=dtype, device="meta"), requires_grad=False)
                setattr(module, child_name, layer)
    lm.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its bnb LoRA layer
    return lm


def _to_fake(module):
    """Replace every meta parameter and buffer by a fake CPU tensor of the same shape (ties kept)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    if "dynamic" not in bnbf.name2qmap:  # double quantization's code book, a real (tiny) constant
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            bnbf.name2qmap["dynamic"] = bnbf.create_dynamic_map()
    done = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                if isinstance(mod, bnb.nn.Linear4bit) and name == "weight":
                    out_f, in_f = mod.out_features, mod.in_features
                    w4, state = bnb.functional.quantize_4bit(torch.empty(out_f, in_f, dtype=mod.compute_dtype),
                                                            blocksize=64, compress_statistics=True, quant_type="nf4")
                    new = nn.Parameter(w4, requires_grad=False)
                    new.quant_state = state
                    mod.quant_state = state
                else:
                    new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                done[id(p)] = new
            mod._parameters[name] = done[id(p)]
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype)
    return module


def _packed_lm_with_loss():
    """LMWithLoss for packed batches with a static shape: `hidden[targets != IGNORE_INDEX]` has a
    data-dependent size that fake tensors cannot have, so every target counts (the worst case: a block
    of response tokens only); the selection is still a gathered copy, as the boolean index makes."""
    from trainer.model import LMWithLoss, chunked_lm_loss, packed_causal_mask

    class PackedLMWithLoss(LMWithLoss):
        def forward(self, idx, targets, position_ids=None, attention_mask=None):
            attention_mask = packed_causal_mask(position_ids)
            hidden = self.lm.transformer(input_ids=idx, position_ids=position_ids,
                                         attention_mask=attention_mask).last_hidden_state
            keep = torch.arange(targets.numel())
            hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)
            return chunked_lm_loss(self.lm.lm_head, hidden, targets.reshape(-1).index_select(0, keep))

    return PackedLMWithLoss


def build_module(cfg, shape, plan, fake_mode, packed=False):
    """LMWithLoss around the GPT-2 the loop builds for this plan: built on the meta device, then fake."""
    from trainer.adapters import apply_mode, use_dequantizing_matmul
    from trainer.model import LMWithLoss
    dtype = DTYPES[plan.dtype]
    with torch.device("meta"):
        lm = _gpt2(shape, cfg, dtype)
        if plan.mode == "qlora":
            lm = _quantizable(lm, dtype)
            use_dequantizing_matmul(lm)
        if not cfg.get("bias", True):
            for name, param in lm.named_parameters():
                if name.endswith(".bias"):
                    param.requires_grad_(False)  # remove_biases, less the zeroing
        if plan.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm = apply_mode(lm, plan, cfg)
        # DeepSpeed casts the module to the compute dtype (engine._configure_distributed_model): the adapters too
        for param in lm.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        module = (_packed_lm_with_loss() if packed else LMWithLoss)(lm).train()
    with fake_mode:
        return _to_fake(module)


# ----------------------------------------------------------------------------- DeepSpeed's optimizer step

def _adamw(params, cfg, foreach=True):
    # what build_ds_config's {"type": "AdamW", "torch_adam": true} becomes; foreach, as torch picks on CUDA
    # (foreach=False: the per-tensor loop torch picks on the CPU, to compare with a real CPU engine)
    return torch.optim.AdamW(params, lr=cfg.get("learning_rate", 1e-4), betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.1, foreach=foreach)


class _Zero0Step:
    """ZeRO-0: 16-bit is FP16_UnfusedOptimizer around torch AdamW on fp32 masters; fp32 is AdamW itself.

    The parameters come in trainer/engine.param_groups' order (decayed 2-D weights first), as the
    engine's optimizer holds them: on the CPU's per-tensor path the previous tensor's denominator is
    still alive while the next one's is computed, so the order matters there.
    """

    def __init__(self, params, cfg, dtype, foreach=True):
        self.dtype = dtype
        ordered = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]
        self.params = ordered
        if dtype == torch.float32:
            self.masters = ordered
        else:
            self.masters = [nn.Parameter(p.detach().float()) for p in ordered]
        decay = [m for m in self.masters if m.dim() >= 2]
        groups = [{"params": decay, "weight_decay": 0.1}]
        if len(decay) < len(self.masters):
            groups.append({"params": self.masters[len(decay):], "weight_decay": 0.0})
        self.opt = _adamw(groups, cfg, foreach)

    def step(self):
        if self.dtype != torch.float32:
            for master, p in zip(self.masters, self.params):
                # the grad norm: one fp32 copy at a time (deepspeed.runtime.utils.get_weight_norm)
                p.grad.float().norm()
                master.grad = p.grad.to(torch.float32)
        self.opt.step()
        if self.dtype != torch.float32:
            for master, p in zip(self.masters, self.params):
                master.grad = None
                p.data.copy_(master.data)


class _ZeroStep:
    """ZeRO 1-3 (stage_1_and_2.py / stage3.py): AdamW on this rank's flat fp32 partition, its fp32 grads."""

    def __init__(self, params, cfg, n_ranks, foreach=True):
        numel = sum(p.numel() for p in params)
        self.part = -(-numel // n_ranks)
        self.master = nn.Parameter(torch.empty(self.part, dtype=torch.float32))
        self.opt = _adamw([self.master], cfg, foreach)

    def step(self):
        self.master.grad = torch.empty(self.part, dtype=torch.float32)
        self.opt.step()
        self.master.grad = None


class _Bf16Step:
    """The fast bf16 path (trainer/engine.fast_bf16_path): DeepSpeed ZeRO-1 with grad_accum_dtype fp32, which
    DeepSpeed 0.19.8 wraps in BF16_Optimizer (runtime/bf16_optimizer.py), around torch's fused AdamW.

    What it keeps (_setup_for_real_optimizer), per param group of trainer/engine.param_groups (decayed 2-D
    weights, then the rest): the bf16 weights moved into one flat tensor (the same bytes, less at most
    2 * ranks elements of alignment padding: the module's parameters stand for it here), a flat fp32
    gradient buffer of the whole group (zeros_like the flat bf16 group: not partitioned), and an fp32 master
    partition of 1/ranks of the group (Adam's moments are its size). immediate_grad_update is off by default,
    so the bf16 .grad tensors stay allocated between micro-steps (zeroed, not freed) until the step's
    zero_grad(set_to_none=True).
    """

    def __init__(self, params, cfg, n_ranks):
        from trainer.memory_model import ZERO0_ALLREDUCE_ELEMENTS
        self.bucket_elements = ZERO0_ALLREDUCE_ELEMENTS  # engine.allreduce_gradients' MEMORY_OPT_ALLREDUCE_SIZE
        decay = [p for p in params if p.dim() >= 2]
        groups = [g for g in (decay, [p for p in params if p.dim() < 2]) if g]
        self.groups, self.hp_flat, self.hp_grads, self.masters, self.partitions = groups, [], [], [], []
        align = 2 * n_ranks  # nccl_start_alignment_factor * dp world size
        for group in groups:
            numel = sum(p.numel() for p in group)
            padded = -(-numel // align) * align
            flat = torch.zeros(padded, dtype=torch.float32)
            self.hp_flat.append(flat)
            views, offset = [], 0
            for p in group:
                views.append(flat.narrow(0, offset, p.numel()).view(p.shape))
                offset += p.numel()
            self.hp_grads.append(views)
            part = padded // n_ranks
            self.partitions.append(flat.narrow(0, 0, part))  # this rank's gradient partition (a view)
            self.masters.append(nn.Parameter(torch.empty(part, dtype=torch.float32)))
        weight_decay = [0.1, 0.0]
        self.opt = torch.optim.AdamW([{"params": [m], "weight_decay": weight_decay[i]}
                                      for i, m in enumerate(self.masters)],
                                     lr=cfg.get("learning_rate", 1e-4), betas=(0.9, 0.95), eps=1e-8, fused=True)

    def backward_epilogue(self):
        """update_hp_grads, after every micro-step's backward: hp_grad.add_(lp.grad.to(fp32)), one at a time."""
        for group, views in zip(self.groups, self.hp_grads):
            for p, hp in zip(group, views):
                hp.add_(p.grad.to(torch.float32).view(hp.shape))

    def allreduce(self):
        """engine.allreduce_gradients at the boundary: buffered_allreduce_fallback over the fp32 flat buffers."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        bucket, numel = [], 0
        buckets = []
        for flat in self.hp_flat:  # allreduce_no_retain
            bucket.append(flat)
            numel += flat.numel()
            if numel > self.bucket_elements:
                buckets.append(bucket)
                bucket, numel = [], 0
        if bucket:
            buckets.append(bucket)
        for bucket in buckets:  # allreduce_and_copy -> allreduce_bucket
            tensor = _flatten_dense_tensors(bucket)
            comm = tensor.to(torch.bfloat16)  # communication_data_type: bf16 when bf16 is enabled
            tensor.copy_(comm)  # (dist.all_reduce(comm) in between)
            del comm
            for buf, synced in zip(bucket, _unflatten_dense_tensors(tensor, bucket)):
                buf.copy_(synced)
            del tensor

    def step(self):
        self.backward_epilogue()
        self.allreduce()
        # BF16_Optimizer.step: get_global_norm_of_tensors (fp32 already: .float() copies nothing)
        norms = [g.float().norm(2) for views in self.hp_grads for g in views]
        torch.stack(norms).pow(2.0).sum()
        del norms
        for master, part in zip(self.masters, self.partitions):
            master.grad = part  # fp32 accumulation: the partition itself, no copy
        self.opt.step()  # torch._fused_adamw_: in place
        for group, master in zip(self.groups, self.masters):  # update_lp_params: copy_ into the bf16 weights
            offset = 0
            for p in group:
                if offset + p.numel() > master.numel():
                    break
                p.data.copy_(master.data.narrow(0, offset, p.numel()).view(p.shape))
                offset += p.numel()
        for flat in self.hp_flat:  # clear_hp_grads
            flat.zero_()
        # the engine's zero_grad(set_to_none=True) then frees the bf16 .grad tensors


# ----------------------------------------------------------------------------- the simulation

def _tracker():
    """MemTracker counting every live storage, keeping only the process-wide peak.

    Its per-module peak snapshots (a deep copy per module per op) are not used here and would make
    gpt2-xl take minutes; the totals are MemTracker's own. Its gradient hooks only relabel storages it
    already counts, and cannot be put on frozen parameters (LoRA's base), so they are left out.
    """
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state):
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return PeakTracker()


@dataclasses.dataclass
class Simulation:
    items: dict        # simulated bytes per memory item (None where the simulation does not hold it)
    peak_forward_backward: int  # live bytes at the peak of forward + backward (states included)
    peak_step: int     # live bytes at the peak of the optimizer step


def _live(tracker):
    snap = tracker.get_tracker_snapshot("current")
    return sum(d.get("Total", 0) for d in snap.values())


def _peak(tracker):
    snap = tracker.get_tracker_snapshot("peak")
    return sum(d.get("Total", 0) for d in snap.values())


def _nbytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = id(st) if not hasattr(st, "_cdata") else st._cdata
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _weights_bytes(module):
    total = 0
    for p in module.parameters():
        total += p.untyped_storage().nbytes()
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # absmax (uint8 with double quantization) + its fp32 state2
            total += qs.absmax.untyped_storage().nbytes()
            if qs.state2 is not None:
                total += qs.state2.absmax.untyped_storage().nbytes() + qs.state2.code.untyped_storage().nbytes()
    return total


def simulate(cfg, shape, plan, packed=False, foreach=True):
    """Run one micro-step (forward, backward) and one optimizer step of `plan` on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.engine import fast_bf16_path  # the optimizer DeepSpeed is configured with for this plan
    b, s = plan.micro_batch_size, cfg["block_size"]
    dtype = DTYPES[plan.dtype]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    module = build_module(cfg, shape, plan, fake_mode, packed)
    with fake_mode, cuda_kernels():
        params = [p for p in module.parameters() if p.requires_grad]
        # Accumulated gradients of the earlier micro-steps are already there (DeepSpeed accumulates into .grad)
        for p in params:
            p.grad = torch.zeros_like(p)
        idx = torch.zeros(b, s, dtype=torch.long)
        targets = torch.zeros(b, s, dtype=torch.long)
        position_ids = torch.zeros(b, s, dtype=torch.long) if packed else None

        tracker = _tracker()
        tracker.track_external(*module.parameters(), *(p.grad for p in params))
        with tracker:
            before = _live(tracker)
            loss = module(idx, targets, position_ids) if packed else module(idx, targets)
            loss.backward()
            del loss
        fwd_bwd_peak = _peak(tracker)
        act = fwd_bwd_peak - before

        weights = _weights_bytes(module)
        gradients = _nbytes(p.grad for p in params)
        transient = states = 0
        if plan.offload == "none":
            extra = []
            if fast_bf16_path(plan, plan.device_type == "cuda"):
                opt = _Bf16Step(params, cfg, plan.n_devices)
                extra = opt.hp_flat
                gradients += _nbytes(extra)
            elif plan.zero_stage == 0:
                opt = _Zero0Step(params, cfg, dtype, foreach)
            else:
                opt = _ZeroStep(params, cfg, plan.n_devices, foreach)
            opt.step()  # the first step creates the moments; the second is every later step
            masters = opt.masters if plan.zero_stage == 0 else [opt.master]
            states = _nbytes(list(opt.opt.state[m]["exp_avg"] for m in masters)
                             + list(opt.opt.state[m]["exp_avg_sq"] for m in masters)
                             + ([] if dtype == torch.float32 and plan.zero_stage == 0 else masters))
            step_tracker = _tracker()
            step_tracker.track_external(opt.opt, *module.parameters(), *masters, *(p.grad for p in params), *extra)
            with step_tracker:
                before_step = _live(step_tracker)
                opt.step()
            step_peak = _peak(step_tracker)
            transient = step_peak - before_step
        else:
            step_peak = 0
    zero0 = plan.zero_stage == 0 and plan.offload == "none"
    items = {"weights": weights if zero0 else None, "gradients": gradients if zero0 else None,
             "optimizer_states": states if zero0 else None,
             "activations_and_logits": act, "optimizer_step_transient": transient}
    return Simulation(items, fwd_bwd_peak, step_peak)


def comparison(plan, sim):
    """Rows (item, estimated, simulated, difference) for the items the simulation holds."""
    m = plan.memory
    est = {"weights": m["weights"], "gradients": m["gradients"], "optimizer_states": m["optimizer_states"],
           "activations_and_logits": m["activations"] + m["logits_and_loss"],
           "optimizer_step_transient": m["optimizer_step_transient"]}
    rows = []
    for item, e in est.items():
        s = sim.items.get(item)
        rows.append({"item": item, "estimated": int(e), "simulated": s,
                     "difference": None if s is None else (e - s) / s if s else 0.0})
    return rows


def _fmt(n):
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def format_comparison(rows):
    lines = ["simulated step (fake tensors, CUDA kernels; see trainer/simulate.py):",
             f"  {'item':<28}{'estimated':>12}{'simulated':>12}{'difference':>12}"]
    for r in rows:
        diff = "-" if r["difference"] is None else f"{100 * r['difference']:+.1f}%"
        lines.append(f"  {r['item']:<28}{_fmt(r['estimated']):>12}{_fmt(r['simulated']):>12}{diff:>12}")
    lines.append("  not seen by the simulation: allocator fragmentation, CUDA context, cuBLAS/flash workspaces, "
                 "NCCL and DeepSpeed buffers (the estimate's ds_buckets and context_and_fragmentation cover them)")
    return "\n".join(lines)


def plan_shape(plan_cfg):
    return {k: int(plan_cfg[k]) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}


def add_simulation(output, cfg, plan):
    """--plan --simulate: the plan's text or JSON dict with the simulated step added.

    cfg is the planner's input ({**config, **shape}): its 'packed' says whether batches are packed
    instruction blocks (launch/train.py read it from the dataset's meta.pkl once, for the plan too)."""
    packed = cfg["packed"]
    sim = simulate(cfg, plan_shape(cfg), plan, packed=packed)
    rows = comparison(plan, sim)
    if isinstance(output, dict):
        return {**output, "simulation": {"packed": packed, "items": rows, "peak_forward_backward": sim.peak_forward_backward,
                                         "peak_step": sim.peak_step}}
    return output + "\n" + format_comparison(rows)
