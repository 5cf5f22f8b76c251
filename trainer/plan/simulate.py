"""`--plan --simulate`: run the plan's exact training step on fake tensors and count its memory.

The memory model (trainer/plan/memory.py) is arithmetic; this module checks it against the step the
trainer really runs, at the real shapes, without weights, data or a GPU: the module built by the training
builder (trainer/model/builder.py: LMWithLoss with the chunked loss; transformers' gradient checkpointing;
LoRA/QLoRA adapters; packed instruction batches with their block-diagonal mask when the dataset is
packed), the plan's micro-batch, block size and dtype, forward, backward and the optimizer step DeepSpeed
runs with the config's AdamW settings and parameter groups (trainer/optim/optimizer.py), all on torch's
FakeTensorMode (CPU fake tensors: a CPU-only torch cannot run autograd on fake CUDA tensors), counted by
torch.distributed._tools.mem_tracker.MemTracker. The kernels a CUDA run picks stand in for the CPU's inside
`with cuda_kernels():` (trainer/plan/cuda_kernels.py).

The optimizer step is DeepSpeed's for the plan (torch AdamW, `torch_adam: true`, foreach as on CUDA):
ZeRO-0 in 16 bits is DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py, step(): an
fp32 copy of every gradient next to the fp32 master weights, then AdamW on the masters); ZeRO 1-3 step on
a flat fp32 partition of the gradients; offload steps on the CPU (nothing on the GPU). bf16 at ZeRO-0
without offload on a GPU takes the fast path (trainer/plan/memory.deepspeed_path): DeepSpeed's
BF16_Optimizer around torch's fused AdamW (_Bf16Step: the fp32 gradient buffer, the fp32 master partition,
the bf16 -> fp32 accumulation after backward, the all-reduce's copies, the fused step).

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
import gc

import torch
from torch import nn
from transformers import GPT2LMHeadModel

from trainer.model.adapters import use_dequantizing_matmul
from trainer.model.attention import packed_causal_mask
from trainer.model.builder import build_module
from trainer.model.gpt2 import TORCH_DTYPES, fit_to_config, gpt2_config
from trainer.model.loss import LMWithLoss, chunked_lm_loss
from trainer.model.offload import MIN_BYTES as OFFLOAD_MIN_BYTES
from trainer.optim.optimizer import (adam_mini_optimizer, adamw_hyperparameters, client_optimizer, is_client,
                                     master_optimizer, param_groups)
from trainer.optim.release import step_in_backward
from trainer.plan.cuda_kernels import cuda_kernels
from trainer.plan.memory import ZERO0_ALLREDUCE_ELEMENTS, deepspeed_path
from trainer.units import MiB, format_bytes


# ----------------------------------------------------------------------------- the module as trained

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


class PackedLMWithLoss(LMWithLoss):
    """LMWithLoss for packed batches with a static shape: `hidden[targets != IGNORE_INDEX]` has a
    data-dependent size that fake tensors cannot have, so every target counts (the worst case: a block
    of response tokens only); the selection is still a gathered copy, as the boolean index makes."""

    def loss(self, idx, targets, position_ids=None, attention_mask=None):
        attention_mask = packed_causal_mask(position_ids)
        hidden = self.lm.transformer(input_ids=idx, position_ids=position_ids,
                                     attention_mask=attention_mask).last_hidden_state
        keep = torch.arange(targets.numel())
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)
        return chunked_lm_loss(self.lm.lm_head, hidden, targets.reshape(-1).index_select(0, keep))


def build_fake_module(cfg, shape, plan, fake_mode, packed=False):
    """The module the loop trains for this plan, through the same builder (trainer/model/builder.py), with a
    base made on the meta device from the shape (no weights) and then made of fake CPU tensors."""
    dtype = TORCH_DTYPES[plan.dtype]
    with torch.device("meta"):
        config = gpt2_config(shape, cfg.dropout)
        config._attn_implementation = "sdpa"
        base = GPT2LMHeadModel._from_config(config, dtype=dtype)
        if plan.mode == "qlora":
            base = _quantizable(base, dtype)
            use_dequantizing_matmul(base)
        fit_to_config(base, cfg)
        # packed batches: the dense block mask of the memory-efficient kernel (the CPU's and the planner's count)
        module = build_module(cfg, plan, base, "dense_mask", PackedLMWithLoss if packed else LMWithLoss)
        # DeepSpeed casts the module to the compute dtype (engine._configure_distributed_model): the adapters too
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        module.train()
    with fake_mode:
        return _to_fake(module)


# ----------------------------------------------------------------------------- DeepSpeed's optimizer step

def _optimizer(name, groups, cfg, cpu_step=False):
    """The optimizer DeepSpeed steps: bitsandbytes' (its fake kernels update in place, as its CUDA kernels do),
    or torch's AdamW as DeepSpeed's config builds it: fused on GPUs (cpu_step=True: the per-tensor loop torch
    runs on the CPU, to compare with a real CPU engine). Hyperparameters: the config's."""
    if is_client(name):
        # bitsandbytes computes its 8-bit code books (real, tiny constants) when it is built: with real tensors
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            return client_optimizer(name, groups, cfg)
    settings = {k: v for k, v in adamw_hyperparameters(cfg).items() if k != "weight_decay"}
    return torch.optim.AdamW(groups, **settings, foreach=False if cpu_step else None, fused=None if cpu_step else True)


class _Zero0Step:
    """ZeRO-0 (the plain and unfused paths): 16-bit is FP16_UnfusedOptimizer around the optimizer on fp32
    masters; fp32 is the optimizer itself on the parameters.

    The parameters come in trainer/optim/optimizer.param_groups' order (decayed 2-D weights first), as the
    engine's optimizer holds them: on the CPU's per-tensor path the previous tensor's denominator is
    still alive while the next one's is computed, so the order matters there.
    """

    def __init__(self, params, cfg, plan, cpu_step=False):
        self.dtype = TORCH_DTYPES[plan.dtype]
        self.params = [p for group in param_groups(params, 0.0) for p in group["params"]]
        if self.dtype == torch.float32:
            self.masters = self.params
        else:
            self.masters = [nn.Parameter(p.detach().float()) for p in self.params]
        self.opt = _optimizer(plan.optimizer, param_groups(self.masters, cfg.weight_decay), cfg, cpu_step)

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


class _OwnWeightsStep:
    """The optimizer on the module's own parameters, after the trainer's gradient norm
    (trainer/run/engine.clip_or_skip: one norm per tensor, then theirs): the bf16_weights path's client optimizer
    (trainer/optim/optimizer.master_optimizer), or Adam-mini on either of its paths (by name: adam_mini_optimizer)."""

    def __init__(self, module, cfg, plan):
        self.masters = [p for group in param_groups(module, 0.0) for p in group["params"]]
        if plan.optimizer == "adam_mini":
            self.opt = adam_mini_optimizer(module, cfg)
            return
        self.opt = master_optimizer(plan.master_weights, param_groups(self.masters, cfg.weight_decay), cfg,
                                    plan.optimizer, plan.optimizer_in_backward)
        if plan.optimizer == "adamw4bit":
            # torchao computes its 4-bit maps (real, tiny constants, cached) at the first step: with real tensors
            from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                get_qmap_signed(), get_qmap_unsigned()

    def step(self):
        if all(p.grad is None for p in self.masters):  # the step inside the backward: nothing left to step
            self.opt.step()
            return
        torch.nn.utils.get_total_norm([p.grad for p in self.masters])
        self.opt.step()  # (torchao's compiled step runs eagerly: simulate()'s _eager_compile)


@contextlib.contextmanager
def _eager_compile():
    """torch.compile as the identity: torchao compiles its per-tensor step, and fake tensors cannot go through
    inductor (it crashes). Its math runs eagerly, each intermediate made (what MASTER_STEP_TEMP_BYTES counts;
    compiled, inductor fuses them, so the estimate is an upper bound)."""
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    try:
        yield
    finally:
        torch.compile = compile_


class _ZeroStep:
    """ZeRO 1-3 (stage_1_and_2.py / stage3.py): the optimizer on this rank's flat fp32 partition of each param
    group, with its fp32 gradient partition made at the step."""

    def __init__(self, params, cfg, plan, cpu_step=False):
        groups = [g for g in param_groups(params, cfg.weight_decay, cfg.loraplus_lr_ratio) if g["params"]]
        self.masters = [nn.Parameter(torch.empty(-(-sum(p.numel() for p in g["params"]) // plan.n_devices),
                                                 dtype=torch.float32)) for g in groups]
        self.opt = _optimizer(plan.optimizer, [{"params": [m], "weight_decay": g["weight_decay"]}
                                               for m, g in zip(self.masters, groups)], cfg, cpu_step)

    def step(self):
        for master in self.masters:
            master.grad = torch.empty_like(master)
        self.opt.step()
        for master in self.masters:
            master.grad = None


class _Bf16Step:
    """The bf16_optimizer path (trainer/plan/memory.py): DeepSpeed ZeRO-1 with grad_accum_dtype fp32, which
    DeepSpeed 0.19.8 wraps in BF16_Optimizer (runtime/bf16_optimizer.py), around the plan's optimizer.

    What it keeps (_setup_for_real_optimizer), per group of trainer/optim/optimizer.param_groups (decayed 2-D
    weights, then the rest): the bf16 weights moved into one flat tensor (the same bytes, less at most
    2 * ranks elements of alignment padding: the module's parameters stand for it here), a flat fp32
    gradient buffer of the whole group (zeros_like the flat bf16 group: not partitioned), and an fp32 master
    partition of 1/ranks of the group (the optimizer's states are its size). With immediate_grad_update (the
    trainer's setting) each bf16 gradient is added into the buffer as backward produces it and freed at once
    (accumulate_hp_grads_and_remove_lp, a hook per parameter: install_hooks).
    """

    def __init__(self, params, cfg, plan):
        self.bucket_elements = ZERO0_ALLREDUCE_ELEMENTS  # engine.allreduce_gradients' MEMORY_OPT_ALLREDUCE_SIZE
        self.n_ranks = plan.n_devices
        # the module's groups (params: the module), LoRA+'s group of B matrices included
        param_group = [g for g in param_groups(params, cfg.weight_decay, cfg.loraplus_lr_ratio) if g["params"]]
        groups = [g["params"] for g in param_group]
        self.groups, self.hp_flat, self.hp_grads, self.masters, self.partitions = groups, [], [], [], []
        align = 2 * self.n_ranks  # nccl_start_alignment_factor * dp world size
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
            part = padded // self.n_ranks
            self.partitions.append(flat.narrow(0, 0, part))  # this rank's gradient partition (a view)
            self.masters.append(nn.Parameter(torch.empty(part, dtype=torch.float32)))
        groups = [{"params": [m], "weight_decay": g["weight_decay"]} for m, g in zip(self.masters, param_group)]
        self.opt = _optimizer(plan.optimizer, groups, cfg)

    def install_hooks(self):
        """accumulate_hp_grads_and_remove_lp: hp_grad.add_(lp.grad.to(fp32)) as each gradient is produced, then
        the bf16 gradient is dropped."""
        for group, views in zip(self.groups, self.hp_grads):
            for p, hp in zip(group, views):
                def accumulate(param, hp=hp):
                    hp.add_(param.grad.to(torch.float32).view(hp.shape))
                    param.grad = None
                p.register_post_accumulate_grad_hook(accumulate)

    def allreduce(self):
        """engine.allreduce_gradients at the boundary, on several ranks only (one rank skips it:
        trainer/run/engine.py): buffered_allreduce_fallback over the fp32 flat buffers."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        if self.n_ranks == 1:
            return
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
        self.allreduce()
        # BF16_Optimizer.step: get_global_norm_of_tensors (fp32 already: .float() copies nothing)
        norms = [g.float().norm(2) for views in self.hp_grads for g in views]
        torch.stack(norms).pow(2.0).sum()
        del norms
        for master, part in zip(self.masters, self.partitions):
            master.grad = part  # fp32 accumulation: the partition itself, no copy
        self.opt.step()  # torch's fused AdamW, bitsandbytes' kernels: in place
        for group, master in zip(self.groups, self.masters):  # update_lp_params: copy_ into the bf16 weights
            offset = 0
            for p in group:
                if offset + p.numel() > master.numel():
                    break
                p.data.copy_(master.data.narrow(0, offset, p.numel()).view(p.shape))
                offset += p.numel()
        for flat in self.hp_flat:  # clear_hp_grads
            flat.zero_()


class _HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """trainer/model/offload.ActivationOffload as the simulation sees it: what would go to pinned host memory
    goes to the meta device, which the tracker does not count, and comes back as a new tensor in backward."""

    def __init__(self):
        super().__init__(self.pack, self.unpack)

    @staticmethod
    def pack(tensor):
        if isinstance(tensor, nn.Parameter) or tensor.untyped_storage().nbytes() < OFFLOAD_MIN_BYTES:
            return tensor
        return ("host", torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="meta"))

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        meta = packed[1]
        return torch.empty_strided(meta.size(), meta.stride(), dtype=meta.dtype)


# ----------------------------------------------------------------------------- the simulation

def peak_tracker():
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


@contextlib.contextmanager
def graphs_freed_as_in_training(module):
    """Free the forward graph an adapter layer builds and backward never reaches, as reference counting does
    in training, when the layer's forward returns.

    MemTracker's backward hooks (torch's register_multi_grad_hook on every module output) close a reference
    cycle over each output's grad_fn. DoRA computes its weight norm from lora_B(lora_A(I)) and detaches it: that
    graph then kept its saved tensors until Python's collector happened to run, so the simulated peak depended
    on the process's history (up to 11% more on gpt2, and a failed CI run). Inside this context the collector
    runs only after each peft adapter layer's forward, over generation 0: with the collector disabled every
    object made since the previous adapter layer is still there, and no hook inside the layer promotes it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def collect(*_):
        gc.collect(0)  # returns None: a forward hook's return value would replace the output

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    handles = [m.register_forward_hook(collect) for m in module.modules() if isinstance(m, BaseTunerLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if was_enabled:
            gc.enable()


@dataclasses.dataclass
class Simulation:
    items: dict        # simulated bytes per memory item (None where the simulation does not hold it)
    peak_forward_backward: int  # live bytes at the peak of forward + backward (states included)
    peak_step: int     # live bytes at the peak of the optimizer step


def _device_bytes(snapshot):
    """Bytes on the simulated device (fake CPU tensors); the meta device stands for host memory (_HostOffload)."""
    return sum(d.get("Total", 0) for device, d in snapshot.items() if torch.device(device).type != "meta")


def _live(tracker):
    return _device_bytes(tracker.get_tracker_snapshot("current"))


def _peak(tracker):
    return _device_bytes(tracker.get_tracker_snapshot("peak"))


def _nbytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao's 4-bit states): the tensors it holds
            total += _nbytes([getattr(t, name) for name in t.__tensor_flatten__()[0]])
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


def _fake_batch(b, s, packed):
    """(idx, targets[, position_ids]) of zeros: what the module is called with."""
    return [torch.zeros(b, s, dtype=torch.long) for _ in range(3 if packed else 2)]


def simulate(cfg, shape, plan, packed=False, cpu_step=False):
    """Run one micro-step (forward, backward) and one optimizer step of `plan` on fake tensors.

    cpu_step: torch's AdamW as on the CPU (per tensor) instead of CUDA's fused kernel, to compare with a real
    CPU engine (tests/optimizer_step.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, s = plan.micro_batch_size, cfg.block_size
    dtype = TORCH_DTYPES[plan.dtype]
    path = deepspeed_path(plan.zero_stage, plan.offload, plan.dtype, plan.grad_accum_dtype,
                          plan.master_weights).optimizer
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    module = build_fake_module(cfg, shape, plan, fake_mode, packed)
    if plan.activation_offload:
        module.offload = _HostOffload()
    with fake_mode, cuda_kernels(), _eager_compile():
        params = [p for p in module.parameters() if p.requires_grad]
        extra = []
        released = plan.optimizer_in_backward  # each tensor stepped by a hook in the backward
        if released:
            # (trainer/optim/release.py: its own hook's norm check is a host sync, which fake tensors cannot do; its
            # scalars and in-place clip add nothing measurable)
            opt = _OwnWeightsStep(module, cfg, plan)
            step_in_backward(module, opt.opt)
            warm = module(*_fake_batch(b, s, packed))  # the first backward creates the states: the second is a step
            warm.backward()
            del warm
        elif path == "bf16_optimizer":
            # the fp32 buffer holds the earlier micro-steps' gradients; no bf16 gradient stays between them
            opt = _Bf16Step(module, cfg, plan)  # the module: LoRA+ finds its B matrices by name
            opt.install_hooks()
            extra = opt.hp_flat
        elif not released:
            # accumulated gradients of the earlier micro-steps are already there (DeepSpeed accumulates into .grad)
            for p in params:
                p.grad = torch.zeros_like(p)
        idx, targets, *position_ids = _fake_batch(b, s, packed)
        position_ids = position_ids[0] if packed else None

        tracker = peak_tracker()
        tracker.track_external(*module.parameters(), *(p.grad for p in params if p.grad is not None), *extra)
        if released:
            # the states the warm backward made: known to the tracker before the hooks update them in place,
            # or it would register each one as new memory the first time a hook's op returns it (the backward's
            # peak then grew by the states stepped before it: +8.4 GiB on gpt2-xl with recomputation)
            tracker.track_external(opt.opt)
        with tracker, graphs_freed_as_in_training(module):
            before = _live(tracker)
            loss = module(idx, targets, position_ids) if packed else module(idx, targets)
            loss.backward()
            del loss
        fwd_bwd_peak = _peak(tracker)
        act = fwd_bwd_peak - before

        weights = _weights_bytes(module)
        gradients = _nbytes([p.grad for p in params] + extra)
        transient = states = 0
        if plan.offload == "none":
            if path != "bf16_optimizer" and not released:  # (those are built above: their hooks run in backward)
                opt = _OwnWeightsStep(module, cfg, plan) if path == "bf16_weights" or plan.optimizer == "adam_mini" \
                    else _Zero0Step(params, cfg, plan, cpu_step) if plan.zero_stage == 0 \
                    else _ZeroStep(module, cfg, plan, cpu_step)
            opt.step()  # the first step creates the states; the second is every later step
            own_masters = (dtype != torch.float32 or plan.zero_stage > 0 or path == "bf16_optimizer") \
                and path != "bf16_weights"  # (that path's optimizer steps the module's own parameters)
            states = _nbytes([t for m in opt.masters for t in opt.opt.state[m].values() if isinstance(t, torch.Tensor)]
                             + (opt.masters if own_masters else []))
            if path != "bf16_optimizer" and not released:
                for p in params:  # the next micro-step's accumulation starts from these
                    p.grad = torch.zeros_like(p)
            step_tracker = peak_tracker()
            step_tracker.track_external(opt.opt, *module.parameters(), *opt.masters,
                                        *(p.grad for p in params if p.grad is not None), *extra)
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
    """Rows (item, estimated, simulated, difference) for the items the simulation holds. The step inside the
    backward: its transient (the last, largest tensor's gradient and step) is inside the backward's peak, and
    nothing is left for engine.step() to do."""
    m = plan.estimate.items
    act, transient = m["activations"] + m["logits_and_loss"], m["optimizer_step_transient"]
    if plan.optimizer_in_backward:
        act, transient = max(act, transient), 0
    est = {"weights": m["weights"], "gradients": m["gradients"], "optimizer_states": m["optimizer_states"],
           "activations_and_logits": act, "optimizer_step_transient": transient}
    rows = []
    for item, e in est.items():
        s = sim.items.get(item)
        # items under a MiB on both sides (an in-place optimizer's scalars) count as equal
        rows.append({"item": item, "estimated": int(e), "simulated": s,
                     "difference": None if s is None else 0.0 if max(e, s) < MiB else (e - s) / s})
    return rows


def format_comparison(rows):
    lines = ["simulated step (fake tensors, CUDA kernels; see trainer/plan/simulate.py):",
             f"  {'item':<28}{'estimated':>12}{'simulated':>12}{'difference':>12}"]
    for r in rows:
        diff = "-" if r["difference"] is None else f"{100 * r['difference']:+.1f}%"
        simulated = "-" if r["simulated"] is None else format_bytes(r["simulated"])
        lines.append(f"  {r['item']:<28}{format_bytes(r['estimated']):>12}{simulated:>12}{diff:>12}")
    lines.append("  not seen by the simulation: allocator fragmentation, CUDA context, cuBLAS/flash workspaces, "
                 "NCCL and DeepSpeed buffers (the estimate's ds_buckets and context_and_fragmentation cover them)")
    return "\n".join(lines)


def add_simulation(output, cfg, plan_input, plan):
    """--plan --simulate: the plan's text or JSON dict with the simulated step added (the planner's input
    says the shape and whether batches are packed instruction blocks)."""
    packed = plan_input.packed
    sim = simulate(cfg, plan_input.shape, plan, packed=packed)
    rows = comparison(plan, sim)
    if isinstance(output, dict):
        return {**output, "simulation": {"packed": packed, "items": rows,
                                         "peak_forward_backward": sim.peak_forward_backward,
                                         "peak_step": sim.peak_step}}
    return output + "\n" + format_comparison(rows)
