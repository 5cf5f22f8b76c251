"""The memory model: bytes per device for one candidate plan, from the model's shape alone.

Pure arithmetic (no torch, no model construction), so the planner can try hundreds of
candidates for gpt2-xl in milliseconds. docs/plan.md describes the plan; the
DeepSpeed-specific details below (which fp32 copies exist when, which buffers are
allocated) were read from deepspeed 0.19's engine, stage_1_and_2, stage3 and
fp16/fused_optimizer and bf16_optimizer code paths.

Peak = weights + gradients + optimizer states + DeepSpeed buckets
       + max(activations + logits/loss,  optimizer-step transient)
       + fragmentation (a fraction of that) + the CUDA context.
Activations and the optimizer-step transient never coexist: by the time the optimizer
steps, the backward pass has released every activation.
"""
from dataclasses import dataclass
from typing import NamedTuple

from trainer.config import LORA_TARGETS
from trainer.model.shapes import (LOSS_CHUNK_BYTES, Shape, gpt2_named_shapes, gpt2_param_count,
                                  gpt2_tensor_numels, gpt2_tensors, linear_weight_count, lora_group_numels,
                                  lora_projections, lora_tensor_numels, lora_trainable_count)
from trainer.optim.optimizer import (ADAM_MINI_TEMP_ELEMENTS, adam_mini_state_bytes, master_state_bytes,
                                     master_step_temporaries, state_bytes, unpaged)
from trainer.units import GiB, MiB

# ---------------------------------------------------------------------------------------
# Calibrated constants. No GPU was available when these were set: they are documented
# defaults, TO BE CALIBRATED from bench/MEMORY.md (bench/memory_fit.py: predicted vs
# measured max_memory_allocated / reserved per GPT-2 size and memory cap). Change them
# here only, citing the table row they came from.
# ---------------------------------------------------------------------------------------
CUDA_CONTEXT_BYTES = 500 * MiB    # CUDA context + cuBLAS/NCCL workspaces, outside torch's allocator
CPU_PROCESS_BYTES = 1 * GiB       # resident python + torch + deepspeed per rank on a CPU-only machine
FRAGMENTATION = 0.10              # caching allocator: reserved exceeds allocated by this fraction at peak
# Per layer, 16-bit, flash SDPA, the fused tanh GELU: 32 (was 34, Korthikanti et al.'s count for
# Megatron's layer). Measured by trainer/plan/simulate.py on the real step (bench/SIMULATE.md): ln_1 input 2,
# c_attn input 2 + output 6, attention output 2, c_proj input (the same) 0, residual + ln_2 input 2,
# c_fc input 2, GELU input 8, c_proj input 8: 32. Flash attention adds an fp32 log-sum-exp per head and
# token (ATTN_LSE_BYTES). GPT-2's own gelu_new would add four more 4h-wide tensors (56).
ACT_BYTES_PER_SBH = 32
ATTN_LSE_BYTES = 4                # per head per token per layer (flash SDPA's fp32 logsumexp)
CKPT_BYTES_PER_SBH = 2            # per checkpointed layer: its 16-bit input hidden state
OUTSIDE_LAYERS_SBH = 4            # embedding sum + final LayerNorm input/output, 16-bit
LOGITS_BYTES_PER_ELEMENT = 12     # per chunk element: fp32 log-probs kept + their grad + logits' grad
# With recomputation the peak can be one recomputed layer's backward instead of the loss (a large micro-batch:
# its activations outgrow the loss's chunk). Live there besides the layer's activations: the gradient arriving
# at its output and the one it makes for its input (RECOMPUTE_BACKWARD_SBH, 16-bit), in full mode the tied
# wte/lm_head weight's gradient from the head (V x h), and with activation offload the saved tensors brought
# back from the host for that layer (OFFLOAD_RETURNED_SBH). Simulated (issue 20's plan table: gpt2-medium full
# at 8 GB, micro-batch 32, was estimated 29% low): 4.1 and 5.9 bytes/sbh besides V x h x 2, at gpt2, -medium and
# -large, micro-batch 32 and 64.
# LoRA/QLoRA's backward there holds more: each adapted projection's input gradient through its adapters as
# well as through the frozen weight, before they are summed (simulated: 10.0 bytes/sbh more at gpt2 micro-batch
# 64 and gpt2-medium 32, with and without activation offload).
RECOMPUTE_BACKWARD_SBH = 4
OFFLOAD_RETURNED_SBH = 6
LORA_BACKWARD_SBH = 10
# LoRA dropout (peft) keeps, per targeted projection, a dropped copy of its input and CUDA's bool mask;
# the frozen base then no longer keeps that input, except attention's c_proj input (flash keeps it):
# net 1 byte per input element, plus the compute dtype for attn.c_proj. Measured (simulation): 9.08
# bytes per s*b*h per layer for c_attn, c_proj, c_fc at r=8, where the old count said 21.
LORA_DROPOUT_MASK_BYTES = 1
# DoRA (use_dora): peft's DoRA layer returns (m / |W + s BA| - 1) * base output + m / |W + s BA| * s * LoRA
# output and keeps both out-sized outputs for the magnitude m's gradient: 2 tensors of the compute dtype per
# output element of each adapted projection and token. Measured (simulation, `python launch/train.py --recipe
# gpt2_small --plan --vram_gb=80 --simulate --mode=lora --use_dora=True` against --use_dora=False): 4.00
# bytes per token per output element in bf16 (8 in fp32) for c_attn, c_proj and c_fc alike, at micro-batch
# 4 to 16, lora_r 8 and 64, lora_dropout 0 and 0.1 (+1.38 GB at micro-batch 4, +5.46 GB at 16), plus at
# most 40 MB that does not grow with the batch (a layer's weight-sized norm temporaries: not counted).
# With gradient checkpointing the term is inside the recomputed layer and adds nothing (measured too).
DORA_KEPT_OUTPUTS = 2
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit + 8-bit absmax per 64 + fp32 per 256 blocks
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # engine.allreduce_gradients' fixed bucket (ZeRO-0 path)
BUCKET_ELEMENTS_LARGE = 200_000_000     # ds_configs/zero1,zero2 templates
BUCKET_ELEMENTS_SMALL = 50_000_000      # ds_configs/zero3 template; also ZeRO-1/2 on small GPUs
SMALL_GPU_BYTES = 20 * GiB              # below this usable memory, ZeRO-1/2 use the small buckets
PERSISTENCE_THRESHOLD = 100_000         # ZeRO-3 keeps tensors this small whole on every rank
# ZeRO-3 releases a gathered parameter after its module unless it recurs within the next
# stage3_max_reuse_distance elements of the trace (partitioned_param_coordinator.__params_to_release),
# and prefetches while fewer than stage3_max_live_parameters are gathered. The templates used to say
# 1e9 for both, which kept every layer whose backward use was < 1e9 elements away (the last ~16 layers
# of gpt2-xl gathered); capped to the prefetch bucket, at most this many more elements stay gathered.
STAGE3_MAX_REUSE_DISTANCE = 50_000_000
STAGE3_MAX_LIVE_PARAMETERS = 50_000_000
# CPU SDPA falls back to the math kernel when attention dropout is on, materializing scores,
# softmax and the mask: measured here (torch 2.13 CPU, fp32) at ~13 bytes per score element.
MATH_ATTN_BYTES_FP32 = 13
# torch AdamW's temporaries on the CPU (per-tensor path), in tensors the size of the largest it updates: the
# previous tensor's denominator is still bound while the next one's sqrt and its scaled copy are made
# (measured on a real engine, tests/optimizer_step.py). On GPUs DeepSpeed runs torch's fused AdamW: none.
ADAM_TEMPS_CPU = 3
# bitsandbytes' CPU kernels (backends/cpu/ops.py), bytes per element of the largest tensor stepped: 8-bit
# dequantizes both moments to fp32, copies the gradient to fp32 and makes the denominator (sqrt, then its
# quotient) before requantizing; its 32-bit kernel keeps three fp32 temporaries. Measured by the peak resident
# memory of one step (bench/optimizer_temps.py, tests/test_optimizer_step.py): 20.05 and 12.11.
BNB_CPU_TEMPS_BYTES = {"adamw8bit": 20, "adamw": 12}

# ---------------------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MEMORY_ITEMS = ("weights", "gradients", "optimizer_states", "ds_buckets", "activations",
                "logits_and_loss", "optimizer_step_transient", "context_and_fragmentation")


@dataclass(frozen=True)
class Candidate:
    """One plan the search considers: the plan keys (dtype is decided before the search)."""
    mode: str          # full | lora | qlora
    zero_stage: int
    offload: str       # none | optimizer | optimizer+params
    gradient_checkpointing: bool
    micro_batch_size: int
    optimizer: str = "adamw"          # trainer/config.OPTIMIZERS
    grad_accum_dtype: str = "auto"    # 'auto': the path's own (default_grad_accum)
    activation_offload: bool = False  # checkpointed activations in pinned CPU memory (needs checkpointing)
    master_weights: str = "fp32"      # trainer/config.MASTER_WEIGHTS: fp32 masters, or the bf16 weights stepped
    optimizer_in_backward: bool = False  # each tensor stepped in the backward as its gradient completes


@dataclass(frozen=True)
class Estimate:
    """The accounting of one candidate: what it needs per device, item by item."""
    items: dict[str, int]   # bytes per device for each of MEMORY_ITEMS (+ offloaded_to_host on CPU)
    allocated: int          # peak of live tensors (what torch.cuda.max_memory_allocated measures)
    total: int              # allocated + fragmentation + context: the number that must fit
    host: int               # bytes per rank kept in CPU memory: offloaded optimizer states, activations
    buckets: dict[str, int]  # DeepSpeed bucket sizes (elements) this estimate assumed
    states: dict[str, int]  # model states held between steps: weights (without ZeRO-3's gathered
                            # modules), gradients, optimizer states; what the engine's tensors add up to
    params_total: int = 0   # parameters the model holds (adapters included)
    params_trainable: int = 0


def bucket_sizes(zero_stage, trainable, usable_bytes):
    """The DeepSpeed bucket sizes (elements) a plan writes into its zero_optimization section."""
    if zero_stage == 0:
        return {}
    large = BUCKET_ELEMENTS_SMALL if zero_stage == 3 or usable_bytes < SMALL_GPU_BYTES else BUCKET_ELEMENTS_LARGE
    # no point in a bucket larger than all the gradients; whole millions keep NCCL's alignment
    size = min(large, -(-max(trainable, 1) // 1_000_000) * 1_000_000)
    if zero_stage == 3:
        # prefetch gathers frozen weights too, so it is not capped by the trainable count
        return {"reduce_bucket_size": size, "stage3_prefetch_bucket_size": BUCKET_ELEMENTS_SMALL,
                "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
                "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
                "stage3_max_reuse_distance": STAGE3_MAX_REUSE_DISTANCE}
    return {"reduce_bucket_size": size, "allgather_bucket_size": size}


def parameter_counts(shape, mode, lora_r, lora_targets, dora=False):
    """(base parameters, trainable parameters, total held by the model)."""
    base = gpt2_param_count(shape.n_layer, shape.n_head, shape.n_embd, shape.vocab_size, shape.block_size)
    if mode == "full":
        return base, base, base
    adapters = lora_trainable_count(shape.n_layer, shape.n_embd, lora_r, lora_targets, dora)
    return base, adapters, base + adapters


def trained_tensors(shape, mode, lora_r, lora_targets, dora=False):
    """(element count, is a matrix) of every trainable tensor: GPT-2's for full mode, LoRA's A and B (matrices)
    and DoRA's magnitudes (vectors) for the adapter modes."""
    if mode == "full":
        return gpt2_tensors(shape.n_layer, shape.n_embd, shape.vocab_size, shape.block_size)
    matrices = lora_tensor_numels(shape.n_layer, shape.n_embd, lora_r, lora_targets)
    magnitudes = lora_tensor_numels(shape.n_layer, shape.n_embd, lora_r, lora_targets, dora)[len(matrices):]
    return [(n, True) for n in matrices] + [(n, False) for n in magnitudes]


# ----------------------------------------------------------------------------- DeepSpeed's optimizer paths
# Which of DeepSpeed 0.19.8's optimizer wrappers a plan runs on (engine._do_optimizer_sanity_check):
#   cpu_adam        offload: ZeRO-Offload steps DeepSpeedCPUAdam in host memory
#   bf16_optimizer  bf16 at ZeRO-0 with fp32 gradient accumulation, built as DeepSpeed ZeRO-1 with
#                   grad_accum_dtype fp32: BF16_Optimizer (runtime/bf16_optimizer.py): flat bf16 weights, a flat
#                   fp32 gradient buffer per group that each gradient is added into as backward produces it
#                   (immediate_grad_update: the bf16 gradient is freed at once), fp32 master partitions, one
#                   optimizer step over them, no per-parameter overflow check (bf16 needs no loss scaling)
#   unfused         fp16, or bf16 accumulating in bf16, at ZeRO-0: FP16_UnfusedOptimizer
#                   (runtime/fp16/unfused_optimizer.py): 16-bit gradients, fp32 masters per tensor, at the step
#                   an fp32 copy of every gradient; per-parameter Python loops (slower)
#   plain           fp32 at ZeRO-0: the optimizer on the parameters themselves
#   zero            ZeRO 1-3: flat fp32 partitions of the masters (stage_1_and_2.py, stage3.py); gradients
#                   accumulate in the compute dtype
#   bf16_weights    master_weights other than fp32 (bf16, ZeRO-0, full mode): no precision section in DeepSpeed's
#                   config, so DeepSpeed wraps nothing; the trainer casts the module to bf16 and hands DeepSpeed a
#                   client optimizer over the bf16 parameters (trainer/optim/optimizer.master_optimizer): bf16
#                   gradients accumulate in p.grad, the states are the client optimizer's, no fp32 copy exists.
#                   DeepSpeed's own bf16_master_weights_and_grads (ZeRO 1-3) clones a bf16 master partition
#                   beside the module's bf16 weights (stage_1_and_2.py: 2 bytes per parameter more on one GPU)
#                   and rounds each update plainly, so it is not used.
# trainer/run/engine.py builds the engine by this rule; the memory model and the simulation count it.

def default_grad_accum(zero_stage, offload, dtype, master_weights="fp32"):
    """The dtype gradients accumulate in unless the plan says otherwise: fp32 where bf16 can have its fp32
    buffer (ZeRO-0, no offload, fp32 masters), else the compute dtype."""
    buffered = dtype == "bf16" and zero_stage == 0 and offload == "none" and master_weights == "fp32"
    return "fp32" if buffered else dtype


def grad_accum(cand, dtype):
    return default_grad_accum(cand.zero_stage, cand.offload, dtype, cand.master_weights) \
        if cand.grad_accum_dtype == "auto" else cand.grad_accum_dtype


class DeepSpeedPath(NamedTuple):
    """What DeepSpeed builds for a plan: `optimizer`, the wrapper it steps through (the paths above), and
    `engine_stage`, the ZeRO stage its engine is built with (the plan's, but 1 on the bf16_optimizer path)."""
    optimizer: str
    engine_stage: int


def deepspeed_path(zero_stage, offload, dtype, grad_accum_dtype, master_weights="fp32"):
    """The one rule for which DeepSpeed path and engine stage a plan becomes (grad_accum_dtype resolved, not
    'auto'): the engine (trainer/run/engine.py), the memory model, the simulation, resume, the checkpoint reader
    and the out-of-memory step-down all ask it."""
    if master_weights != "fp32":  # the planner allows it with bf16 at ZeRO-0 without offload only
        return DeepSpeedPath("bf16_weights", 0)
    if offload != "none":
        return DeepSpeedPath("cpu_adam", zero_stage)
    if zero_stage >= 1:
        return DeepSpeedPath("zero", zero_stage)
    if dtype == "bf16" and grad_accum_dtype == "fp32":
        # DeepSpeed builds BF16_Optimizer only under its ZeRO-1 config (engine._configure_bf16_optimizer)
        return DeepSpeedPath("bf16_optimizer", 1)
    return DeepSpeedPath("plain" if dtype == "fp32" else "unfused", 0)


def saved_deepspeed_path(info):
    """The path a checkpoint was saved from, by its info.json (trainer/run/checkpoint.save): its plan's keys.
    Checkpoints from before the dtype and offload keys name only the engine's stage, which was 1 for a ZeRO-0
    plan on the bf16_optimizer path alone."""
    if "dtype" not in info:
        engine_stage = info.get("engine_zero_stage", info["zero_stage"])
        bf16_optimizer = info["zero_stage"] == 0 and engine_stage == 1
        return DeepSpeedPath("bf16_optimizer" if bf16_optimizer else "unrecorded", engine_stage)
    return deepspeed_path(info["zero_stage"], info["offload"], info["dtype"], info["grad_accum_dtype"],
                          info.get("master_weights", "fp32"))


def path_of(cand, dtype):
    return deepspeed_path(cand.zero_stage, cand.offload, dtype, grad_accum(cand, dtype),
                          cand.master_weights).optimizer


def stepped_tensors(path, trained, n, groups=None):
    """Element counts of the tensors the optimizer steps: every trainable tensor (plain, unfused), or each
    parameter group flattened and partitioned over the n ranks (bf16_optimizer, zero, cpu_adam): `groups` (an
    adapter run's, shapes.lora_group_numels: LoRA+'s B matrices and DoRA's magnitudes are groups of their
    own), else the decayed matrices, then the rest (trainer/optim/optimizer.param_groups)."""
    if path in ("plain", "unfused", "bf16_weights"):
        return [k for k, _ in trained]
    if groups is None:
        groups = [sum(k for k, matrix in trained if matrix), sum(k for k, matrix in trained if not matrix)]
    return [-(-g // n) for g in groups if g]


def bf16_optimizer_transient(group_numels, n):
    """What the bf16_optimizer path allocates outside the forward and backward peak:
    - nothing while backward adds each gradient into the buffer (accumulate_hp_grads_and_remove_lp: one fp32
      copy of one gradient at a time; the largest, the tied wte/lm_head's, comes at the end of backward, when
      the activations are gone: simulated, it does not raise the peak);
    - at the boundary on several ranks, engine.allreduce_gradients -> buffered_allreduce_fallback(
      elements_per_buffer=500M) over the fp32 flat buffers (one per param group, decayed first):
      allreduce_no_retain adds buffers to a bucket until it holds more than 500M elements; allreduce_bucket
      flattens it (a copy when it holds more than one buffer) and casts it to the communication dtype (bf16 by
      default) for the all-reduce (on one rank the trainer turns that all-reduce off: trainer/run/engine.py);
    - BF16_Optimizer.step: the grad norm (scalars), clipping in place, the optimizer over the flat fp32
      partition (torch's fused AdamW and bitsandbytes' 8-bit kernels update in place), the bf16 weights copied
      from the masters in place: nothing the size of the model.
    """
    transient, bucket, numel = 0, [], 0
    if n == 1:
        return transient

    def reduce(bucket, numel):
        return (4 * numel if len(bucket) > 1 else 0) + 2 * numel

    for group in group_numels:
        bucket.append(group)
        numel += group
        if numel > ZERO0_ALLREDUCE_ELEMENTS:
            transient = max(transient, reduce(bucket, numel))
            bucket, numel = [], 0
    if bucket:
        transient = max(transient, reduce(bucket, numel))
    return transient


def estimate(shape: Shape, cand: Candidate, dtype, n_devices, device_type, usable_bytes, lora_r=8,
             lora_targets=LORA_TARGETS, lora_dropout=0.0, dropout=0.0, packed=False, dora=False, loraplus=False):
    """Per-device bytes of one candidate plan (see the module docstring for the peak). dora: DoRA adapters
    (use_dora); loraplus: LoRA+'s own optimizer group for the B matrices (loraplus_lr_ratio != 1)."""
    w = DTYPE_BYTES[dtype]
    path = path_of(cand, dtype)
    base, trainable, _ = parameter_counts(shape, cand.mode, lora_r, lora_targets, dora)
    # every tensor of the model (GPT-2's, then LoRA's) and the trainable ones, by element count
    numels = gpt2_tensor_numels(shape.n_layer, shape.n_embd, shape.vocab_size, shape.block_size)
    adapters = (lora_tensor_numels(shape.n_layer, shape.n_embd, lora_r, lora_targets, dora)
                if cand.mode != "full" else [])
    trained = trained_tensors(shape, cand.mode, lora_r, lora_targets, dora)
    groups = (lora_group_numels(shape.n_layer, shape.n_embd, lora_r, lora_targets, dora, loraplus)
              if cand.mode != "full" else None)
    stepped = stepped_tensors(path, trained, n_devices, groups)
    model_bytes = held_weight_bytes(shape, cand.mode, base, trainable, w)
    resident, weights = weight_bytes(cand, model_bytes, numels + adapters, w, n_devices)
    states, host = optimizer_state_bytes(cand, path, trainable, stepped, model_bytes, w, n_devices)
    if cand.optimizer == "adam_mini":  # by each tensor's name and shape, in the weights' dtype (full mode)
        states = adam_mini_state_bytes(gpt2_named_shapes(shape.n_layer, shape.n_embd, shape.vocab_size,
                                                         shape.block_size), w)
    if cand.optimizer_in_backward and cand.master_weights == "bf16_kahan" and device_type == "cpu":
        # optimi's int32 step counters, host tensors (none on a GPU): one per tensor, and one per param group (decay,
        # no decay: trainer/optim/optimizer.param_groups) made by DeepSpeed's engine.step() stepping no tensor
        states += 4 * (len(stepped) + 2)
    buckets = bucket_sizes(cand.zero_stage, trainable, usable_bytes)
    activations, logits, offloaded = activation_bytes(shape, cand, w, device_type, dropout, packed, lora_r,
                                                      lora_targets, lora_dropout, dora)
    host += offloaded
    items = {
        "weights": int(weights),
        # the step inside the backward frees each gradient once stepped: none is held between steps (the one in
        # flight is the step's transient, counted during the backward below)
        "gradients": 0 if cand.optimizer_in_backward else int(gradient_bytes(cand, path, trainable, w, n_devices)),
        "optimizer_states": int(states),
        # stage_1_and_2.setup_buckets: one reduce_bucket_size buffer (contiguous_gradients, on by default), a
        # second one with overlap_comm (zero2/zero3 templates), in the compute dtype (grad_accum_dtype defaults
        # to it). DeepSpeed's docs' "4.5x the bucket sizes" also counts the all-gather bucket and the fp32
        # gradient partition: here they are the optimizer-step transient.
        "ds_buckets": int(buckets["reduce_bucket_size"] * w * (1 if cand.zero_stage == 1 else 2)) if buckets else 0,
        "activations": int(activations),
        "logits_and_loss": int(logits),
        "optimizer_step_transient": int(step_transient_bytes(cand, path, device_type, trainable, trained, stepped,
                                                             buckets, w, n_devices)),
    }
    if cand.optimizer_in_backward:
        # the step inside the backward: the largest tensor (the tied wte/lm_head) is stepped last, when its
        # gradient is complete and the activations are freed: its gradient beside its step's temporaries. The
        # others step while the activations live, each gradient (at most a layer's c_fc) freed at once: within
        # the activation term, which counts the head's wte gradient already (simulated: the peak unchanged)
        items["optimizer_step_transient"] += int(w * max(stepped))
    allocated = (items["weights"] + items["gradients"] + items["optimizer_states"] + items["ds_buckets"]
                 + max(items["activations"] + items["logits_and_loss"], items["optimizer_step_transient"]))
    if device_type == "cpu":
        # offloading to "CPU memory" on a CPU-only machine moves nothing out of the budget
        items["offloaded_to_host"] = int(host)
        allocated += int(host)
    context = CUDA_CONTEXT_BYTES if device_type == "cuda" else CPU_PROCESS_BYTES
    items["context_and_fragmentation"] = int(FRAGMENTATION * allocated + context)
    states = {"weights": int(resident), "gradients": items["gradients"],
              "optimizer_states": items["optimizer_states"]}
    return Estimate(items, int(allocated), int(allocated + items["context_and_fragmentation"]), int(host),
                    buckets, states, params_total=base + (trainable if cand.mode != "full" else 0),
                    params_trainable=trainable)


def held_weight_bytes(shape, mode, base, trainable, w):
    """The model's weights, unpartitioned: 16-bit (fp32 on CPU); QLoRA's projections in nf4; adapters in
    the compute dtype."""
    if mode == "qlora":
        quantized = linear_weight_count(shape.n_layer, shape.n_embd)
        base_bytes = quantized * NF4_BYTES_PER_PARAM + (base - quantized) * w
    else:
        base_bytes = base * w
    return base_bytes + (trainable * w if mode != "full" else 0)


def weight_bytes(cand, model_bytes, numels, w, n):
    """(weights kept between steps, weights at the forward/backward peak) per device."""
    if cand.zero_stage != 3:
        return model_bytes, model_bytes
    # Each rank keeps its partition, plus whole copies of the tensors at or under the persistence
    # threshold (biases and LayerNorms of the GPT-2 sizes; LoRA's A and B). In the forward and backward
    # passes it gathers one module at a time (the largest is the tied wte/lm_head) plus what it
    # prefetches. On one rank the partition is the whole tensor and gathering allocates nothing
    # (measured, tests/engine_states.py).
    small = sum(k for k in numels if k <= PERSISTENCE_THRESHOLD)
    # the module running + what is prefetched + what recurs within the reuse distance
    gathered = min(max(k for k in numels if k > PERSISTENCE_THRESHOLD) + BUCKET_ELEMENTS_SMALL
                   + STAGE3_MAX_REUSE_DISTANCE, sum(numels) - small) if small < sum(numels) else 0
    partition = 0 if cand.offload == "optimizer+params" else model_bytes / n
    resident = partition + small * w if n > 1 else max(partition, small * w)
    in_flight = gathered * w if n > 1 or cand.offload == "optimizer+params" else 0
    return resident, resident + in_flight


def gradient_bytes(cand, path, trainable, w, n):
    """Gradients of the trainable parameters between steps: in the compute dtype, or the bf16_optimizer
    path's fp32 buffer instead (one flat fp32 buffer per param group, zeros_like the whole flat bf16 group, not
    partitioned; alignment padding, at most 2 * ranks elements per group, is left out)."""
    if path == "bf16_optimizer":
        return 4 * trainable
    if cand.offload != "none" and cand.zero_stage >= 2:
        return 0  # streamed to CPU through the reduce buckets as they are produced
    if cand.zero_stage >= 2:
        return trainable * w / n
    return trainable * w


def optimizer_state_bytes(cand, path, trainable, stepped, model_bytes, w, n):
    """(on the device, in host memory): the optimizer's moments for the tensors it steps (32-bit: 8 bytes per
    element; 8-bit: trainer/optim/optimizer.state_bytes) + an fp32 master copy (4 bytes) per trainable
    parameter. In fp32 training ZeRO-0 updates the parameters themselves; ZeRO>=1 still clones an fp32
    partition; the bf16_optimizer path partitions its masters over the ranks."""
    if path == "bf16_weights":
        return master_state_bytes(cand.master_weights, stepped, cand.optimizer), 0
    moments = state_bytes(cand.optimizer, stepped)
    if path == "plain":
        return moments, 0
    if path == "unfused":
        return moments + 4 * trainable, 0
    masters = 4 * sum(stepped)  # flat partitions: 1/n of each group
    if path != "cpu_adam":
        return moments + masters, 0
    # CPU Adam: moments, master, fp32 grads and a 16-bit staging copy live in host memory
    host = moments + masters + (4 + w) * sum(stepped)
    if cand.offload == "optimizer+params":
        host += model_bytes / n
    return 0, host


def activation_bytes(shape, cand, w, device_type, dropout, packed, lora_r, lora_targets, lora_dropout, dora=False):
    """(activations, logits and loss, activations offloaded to host memory) of one micro-batch, calibrated
    against trainer/plan/simulate.py (bench/SIMULATE.md)."""
    s, b, c, L, V = shape.block_size, cand.micro_batch_size, shape.n_embd, shape.n_layer, shape.vocab_size
    sbh = s * b * c
    scale = w / 2  # the per-sbh constants are for 16-bit tensors
    per_layer = ACT_BYTES_PER_SBH * sbh * scale + ATTN_LSE_BYTES * shape.n_head * s * b
    if device_type == "cpu" and dropout > 0:
        per_layer += shape.n_head * s * s * b * (MATH_ATTN_BYTES_FP32 if w == 4 else 5)
    if packed:
        # instruction batches' block-diagonal mask: CUDA's memory-efficient SDPA turns the bool mask into an
        # additive one of the compute dtype in every layer and keeps it for backward (simulated: 24 bytes
        # per b*s*s at 12 layers in bf16)
        per_layer += b * s * s * w
    if cand.mode != "full":
        targets = set(lora_targets)
        # lora_A's r-wide output, kept by lora_B: one per c_attn and c_fc, two for c_proj (attention and MLP)
        per_layer += s * b * lora_r * w * sum({"c_attn": 1, "c_proj": 2, "c_fc": 1}[t] for t in targets)
        if lora_dropout > 0:
            inputs = {"c_attn": c, "c_proj": c + 4 * c, "c_fc": c}
            per_layer += s * b * sum(inputs[t] for t in targets) * LORA_DROPOUT_MASK_BYTES
            if "c_proj" in targets:
                per_layer += s * b * c * w  # attention's output, kept by flash, and its dropped copy
        if dora:  # the base and LoRA outputs of every adapted projection (DORA_KEPT_OUTPUTS)
            per_layer += s * b * w * DORA_KEPT_OUTPUTS * sum(o for t in targets for _, o in lora_projections(c)[t])
    tokens = s * b
    chunk = min(tokens, max(1, LOSS_CHUNK_BYTES // (4 * V)))
    # logits and loss: one chunk of logits, plus the hidden states feeding the head and their grad;
    # a chunked loss in full mode also holds one chunk's gradient of the tied wte/lm_head weight
    logits = chunk * V * LOGITS_BYTES_PER_ELEMENT + 2 * tokens * c * w
    if cand.mode == "full" and tokens > chunk:
        logits += V * c * w
    offloaded = 0
    saved = (L * (CKPT_BYTES_PER_SBH if cand.gradient_checkpointing else 0) + OUTSIDE_LAYERS_SBH) * sbh * scale
    if cand.gradient_checkpointing:
        # the recomputed layer's activations live while one layer's backward runs, after the loss has
        # freed its chunk: they add only where that peak exceeds the loss's (a large micro-batch)
        layer_peak = per_layer + RECOMPUTE_BACKWARD_SBH * sbh * scale
        if cand.activation_offload:
            layer_peak += OFFLOAD_RETURNED_SBH * sbh * scale
        if cand.mode == "full" and tokens > chunk:
            layer_peak += V * c * w
        if cand.mode != "full":
            layer_peak += LORA_BACKWARD_SBH * sbh * scale
        activations = max(0, layer_peak - logits)
        if cand.activation_offload:
            # the layers' inputs and the embeddings' and final LayerNorm's activations wait in pinned host
            # memory; at the loss's peak the ones coming back add nothing measurable, at a recomputed layer's
            # they are OFFLOAD_RETURNED_SBH above (trainer/model/offload.py; simulated, bench/SIMULATE.md)
            offloaded, saved = saved, 0
        activations += saved
    else:
        activations = L * per_layer + saved
    if packed:
        activations += b * s * s  # the bool mask itself (trainer/model/attention.packed_causal_mask)
    return activations, logits, offloaded


def step_transient_bytes(cand, path, device_type, trainable, trained, stepped, buckets, w, n):
    """The optimizer step's temporaries (fp32 gradient copies, the optimizer's), after the activations are
    freed; `trained`: the trainable tensors, `stepped`: the tensors the optimizer updates."""
    if path == "cpu_adam":
        return 0  # DeepSpeedCPUAdam updates in place on the CPU
    if cand.optimizer == "adam_mini":  # (on GPUs too: its step is eager torch, one tensor at a time)
        optimizer = ADAM_MINI_TEMP_ELEMENTS * w * max(stepped)
    elif path == "bf16_weights":
        optimizer = master_step_temporaries(cand.master_weights, stepped, cand.optimizer)
    else:
        optimizer = optimizer_temporaries(cand.optimizer, device_type, stepped)
    if path == "bf16_optimizer":
        return max(bf16_optimizer_transient(stepped, n), optimizer)
    if path == "zero":
        # the fp32 gradient partition, then the optimizer on the flat fp32 partition
        transient = 4 * sum(stepped) + optimizer
        if cand.zero_stage <= 2:
            transient = max(transient, buckets["allgather_bucket_size"] * w)
        return transient
    # ZeRO-0's gradient all-reduce (engine.buffered_allreduce_fallback), in buckets of 500M elements; on one rank
    # trainer/run/engine.py turns it off for the plain path
    allreduce = min(trainable, ZERO0_ALLREDUCE_ELEMENTS) * w if n > 1 or path == "unfused" else 0
    if path == "unfused":
        # DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py, step): an fp32 copy of every
        # gradient beside the fp32 masters, then the optimizer on the masters
        return max(4 * trainable + optimizer, allreduce)
    return max(allreduce, optimizer)  # plain, bf16_weights: the optimizer on the parameters


def optimizer_temporaries(optimizer, device_type, stepped):
    """What one optimizer step allocates beside its states. On GPUs every optimizer here updates in place:
    torch's fused AdamW (DeepSpeed's config asks for it, trainer/run/engine.py) and bitsandbytes' fused 8-bit
    and 32-bit kernels. On the CPU torch's AdamW steps one tensor at a time (ADAM_TEMPS_CPU temporaries of the
    largest), and bitsandbytes' CPU kernels dequantize, update and requantize the states of one tensor at a
    time (BNB_CPU_TEMPS_BYTES per element of the largest; measured, tests/optimizer_step.py)."""
    if device_type == "cuda":
        return 0
    largest = max(stepped)
    if optimizer == "adamw":
        return ADAM_TEMPS_CPU * 4 * largest
    return BNB_CPU_TEMPS_BYTES[unpaged(optimizer)] * largest
