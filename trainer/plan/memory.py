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

from trainer.config import LORA_TARGETS
from trainer.model.shapes import (LOSS_CHUNK_BYTES, Shape, gpt2_param_count, gpt2_tensor_numels, linear_weight_count,
                                  lora_group_numels, lora_projections, lora_tensor_numels, lora_trainable_count)
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
# Megatron's layer). Measured by trainer/simulate.py on the real step (bench/SIMULATE.md): ln_1 input 2,
# c_attn input 2 + output 6, attention output 2, c_proj input (the same) 0, residual + ln_2 input 2,
# c_fc input 2, GELU input 8, c_proj input 8: 32. Flash attention adds an fp32 log-sum-exp per head and
# token (ATTN_LSE_BYTES). GPT-2's own gelu_new would add four more 4h-wide tensors (56).
ACT_BYTES_PER_SBH = 32
ATTN_LSE_BYTES = 4                # per head per token per layer (flash SDPA's fp32 logsumexp)
CKPT_BYTES_PER_SBH = 2            # per checkpointed layer: its 16-bit input hidden state
OUTSIDE_LAYERS_SBH = 4            # embedding sum + final LayerNorm input/output, 16-bit
LOGITS_BYTES_PER_ELEMENT = 12     # per chunk element: fp32 log-probs kept + their grad + logits' grad
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
# Adam temporaries the size of the largest tensor the optimizer updates: torch's foreach path on
# GPUs keeps one (sqrt of every exp_avg_sq at once, so "largest" is everything); the per-tensor CPU
# path three (the previous tensor's denominator is still bound while the next one's sqrt and its
# scaled copy are made: measured on a real engine, tests/optimizer_step.py, was 2).
ADAM_TEMPS_GPU = 1
ADAM_TEMPS_CPU = 3
# ---------------------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MEMORY_ITEMS = ("weights", "gradients", "optimizer_states", "ds_buckets", "activations",
                "logits_and_loss", "optimizer_step_transient", "context_and_fragmentation")


@dataclass(frozen=True)
class Candidate:
    mode: str          # full | lora | qlora
    zero_stage: int
    offload: str       # none | optimizer | optimizer+params
    gradient_checkpointing: bool
    micro_batch_size: int


@dataclass(frozen=True)
class Estimate:
    """The accounting of one candidate: what it needs per device, item by item."""
    items: dict[str, int]   # bytes per device for each of MEMORY_ITEMS (+ offloaded_to_host on CPU)
    allocated: int          # peak of live tensors (what torch.cuda.max_memory_allocated measures)
    total: int              # allocated + fragmentation + context: the number that must fit
    host: int               # bytes per rank that offload keeps in CPU memory
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


def fast_bf16_path(zero_stage, offload, dtype, on_gpu):
    """bf16 at ZeRO-0 without offload on a GPU runs as DeepSpeed ZeRO-1 with fp32 gradient accumulation.

    DeepSpeed 0.19.8 (engine._do_optimizer_sanity_check) then wraps the optimizer in its BF16_Optimizer
    (runtime/bf16_optimizer.py): flat bf16 weights, one flat fp32 gradient buffer that every micro-step
    accumulates into, fp32 master partitions, one fused optimizer step over them and no per-parameter
    overflow check (bf16 needs no loss scaling). Left at ZeRO-0, DeepSpeed would use FP16_UnfusedOptimizer
    (torch's AdamW is not DeepSpeed's FusedAdam): per-parameter Python loops, a host sync per parameter
    tensor, gradients summed in bf16. The fp32 buffer costs 4 bytes per trainable parameter
    (fp32_grad_accum_bytes). A ZeRO-1 plan keeps ZeRO's own flat partitions (stage_1_and_2: no
    per-parameter syncs either); the unsharded fp32 buffer would cost it more than the sharding it was
    chosen for saves. trainer/run/engine.py builds the engine by this rule; the memory model counts it.
    """
    return on_gpu and dtype == "bf16" and offload == "none" and zero_stage == 0


def fast_bf16(cand, dtype, device_type):
    return fast_bf16_path(cand.zero_stage, cand.offload, dtype, device_type == "cuda")


def fp32_grad_accum_bytes(cand, dtype, trainable, device_type):
    """The fast bf16 path's extra gradient bytes: BF16_Optimizer._setup_for_real_optimizer allocates one flat
    fp32 gradient buffer per param group, zeros_like(the whole flat bf16 group) (not partitioned), and adds
    every micro-step's bf16 gradients into it (update_hp_grads; immediate_grad_update is off by default, so
    the bf16 .grad tensors are zeroed, not freed, between micro-steps: they are counted too). Counted under
    'gradients' (alignment padding, at most 2 * ranks elements per group, is left out)."""
    return 4 * trainable if fast_bf16(cand, dtype, device_type) else 0


def bf16_optimizer_transient(group_numels, largest):
    """What the fast bf16 path allocates after backward, when the activations are gone:
    - every micro-step, BF16_Optimizer.update_hp_grads: hp_grad.add_(lp.grad.to(fp32)), one fp32 copy of
      one gradient at a time (the largest);
    - at the boundary, engine.allreduce_gradients -> buffered_allreduce_fallback(elements_per_buffer=500M)
      over the fp32 flat buffers (one per param group, decayed first): allreduce_no_retain adds buffers to a
      bucket until it holds more than 500M elements; allreduce_bucket flattens it (a copy when it holds more
      than one buffer) and casts it to the communication dtype (bf16 by default) for the all-reduce, even
      on one rank;
    - BF16_Optimizer.step: the grad norm (scalars), clipping in place, torch's fused AdamW (one in-place
      kernel over the flat fp32 partition: no temporaries), the bf16 weights copied from the masters in
      place: nothing the size of the model.
    """
    transient, bucket, numel = 4 * largest, [], 0

    def reduce(bucket, numel):
        return (4 * numel if len(bucket) > 1 else 0) + 2 * numel

    for n in group_numels:
        bucket.append(n)
        numel += n
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
    base, trainable, _ = parameter_counts(shape, cand.mode, lora_r, lora_targets, dora)
    # every tensor of the model (GPT-2's, then LoRA's) and the trainable ones, by element count
    numels = gpt2_tensor_numels(shape.n_layer, shape.n_embd, shape.vocab_size, shape.block_size)
    adapters = (lora_tensor_numels(shape.n_layer, shape.n_embd, lora_r, lora_targets, dora)
                if cand.mode != "full" else [])
    trained = adapters or numels
    model_bytes = held_weight_bytes(shape, cand.mode, base, trainable, w)
    resident, weights = weight_bytes(cand, model_bytes, numels + adapters, w, n_devices)
    states, host = optimizer_state_bytes(cand, dtype, device_type, trainable, model_bytes, w, n_devices)
    buckets = bucket_sizes(cand.zero_stage, trainable, usable_bytes)
    adapter_groups = (lora_group_numels(shape.n_layer, shape.n_embd, lora_r, lora_targets, dora, loraplus)
                      if cand.mode != "full" else None)
    activations, logits = activation_bytes(shape, cand, w, device_type, dropout, packed, lora_r, lora_targets,
                                           lora_dropout, dora)
    items = {
        "weights": int(weights),
        "gradients": int(gradient_bytes(cand, dtype, device_type, trainable, w, n_devices)),
        "optimizer_states": int(states),
        # stage_1_and_2.setup_buckets: one reduce_bucket_size buffer (contiguous_gradients, on by default), a
        # second one with overlap_comm (zero2/zero3 templates), in the compute dtype (grad_accum_dtype defaults
        # to it). DeepSpeed's docs' "4.5x the bucket sizes" also counts the all-gather bucket and the fp32
        # gradient partition: here they are the optimizer-step transient.
        "ds_buckets": int(buckets["reduce_bucket_size"] * w * (1 if cand.zero_stage == 1 else 2)) if buckets else 0,
        "activations": int(activations),
        "logits_and_loss": int(logits),
        "optimizer_step_transient": int(step_transient_bytes(shape, cand, dtype, device_type, trainable, trained,
                                                             buckets, w, n_devices, adapter_groups)),
    }
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


def gradient_bytes(cand, dtype, device_type, trainable, w, n):
    """Gradients (compute dtype) of the trainable parameters, plus the fast bf16 path's fp32 buffer."""
    if cand.offload != "none" and cand.zero_stage >= 2:
        gradients = 0  # streamed to CPU through the reduce buckets as they are produced
    elif cand.zero_stage >= 2:
        gradients = trainable * w / n
    else:
        gradients = trainable * w
    return gradients + fp32_grad_accum_bytes(cand, dtype, trainable, device_type)


def optimizer_state_bytes(cand, dtype, device_type, trainable, model_bytes, w, n):
    """(on the device, in host memory): Adam's moments (8 bytes) + an fp32 master copy (4 bytes) per trainable
    parameter. In fp32 training ZeRO-0 updates the parameters themselves; ZeRO>=1 still clones an fp32
    partition."""
    shard = n if cand.zero_stage >= 1 else 1
    master = 4 * trainable if (w != 4 or cand.zero_stage >= 1) else 0
    if fast_bf16(cand, dtype, device_type):
        # BF16_Optimizer partitions the fp32 masters (and so Adam's moments) over the data-parallel ranks
        # (fp32_groups_flat_partition: one 1/n narrow of the flat group, cloned to fp32)
        shard = n
    states = (8 * trainable + master) / shard
    if cand.offload == "none":
        return states, 0
    # CPU Adam: moments, master, fp32 grads and a 16-bit staging copy live in host memory
    host = states + (4 + w) * trainable / shard
    if cand.offload == "optimizer+params":
        host += model_bytes / n
    return 0, host


def activation_bytes(shape, cand, w, device_type, dropout, packed, lora_r, lora_targets, lora_dropout, dora=False):
    """(activations, logits and loss) of one micro-batch, calibrated against trainer/simulate.py
    (bench/SIMULATE.md)."""
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
    if cand.gradient_checkpointing:
        # the recomputed layer's activations live while one layer's backward runs, after the loss has
        # freed its chunk: they add only where they exceed it (never at GPT-2's vocabulary, measured)
        activations = L * CKPT_BYTES_PER_SBH * sbh * scale + max(0, per_layer - logits)
    else:
        activations = L * per_layer
    activations += OUTSIDE_LAYERS_SBH * sbh * scale
    if packed:
        activations += b * s * s  # the bool mask itself (trainer/model.packed_causal_mask)
    return activations, logits


def step_transient_bytes(shape, cand, dtype, device_type, trainable, trained, buckets, w, n, adapter_groups=None):
    """The optimizer step's temporaries (fp32 gradient copies, Adam's), after the activations are freed;
    `trained`: the element counts of the trainable tensors; `adapter_groups`: an adapter run's elements per
    optimizer group (shapes.lora_group_numels)."""
    temps = ADAM_TEMPS_GPU if device_type == "cuda" else ADAM_TEMPS_CPU
    if cand.offload != "none":
        return 0  # DeepSpeedCPUAdam updates in place on the CPU
    if fast_bf16(cand, dtype, device_type):
        if cand.mode == "full":
            c, L = shape.n_embd, shape.n_layer
            decay = shape.vocab_size * c + shape.block_size * c + L * 12 * c * c  # engine.param_groups: 2-D first
            return bf16_optimizer_transient([decay, trainable - decay], max(trained))
        # LoRA's matrices are one group; LoRA+'s B matrices and DoRA's magnitudes add one each
        return bf16_optimizer_transient(adapter_groups or [trainable], max(trained))
    if cand.zero_stage == 0:
        allreduce = min(trainable, ZERO0_ALLREDUCE_ELEMENTS) * w
        # torch's AdamW: foreach on CUDA (one fp32 temporary the size of everything it updates,
        # torch/optim/adam.py _multi_tensor_adam: _foreach_sqrt(exp_avg_sqs)), per tensor on the CPU
        # (sqrt and its scaled copy of one tensor at a time)
        # (foreach works one param group at a time: an adapter run's largest group)
        largest = max(adapter_groups or [trainable]) if device_type == "cuda" else min(trainable, max(trained))
        adam = temps * 4 * largest
        if w != 4:
            # DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py, step): an fp32 copy
            # of every gradient beside the fp32 masters, then AdamW on the masters
            return max(4 * trainable + adam, allreduce)
        return max(allreduce, adam)  # plain torch AdamW on the parameters
    # the fp32 gradient partition plus Adam's temporaries on the flat fp32 partition
    transient = (4 + temps * 4) * trainable / n
    if cand.zero_stage <= 2:
        transient = max(transient, buckets["allgather_bucket_size"] * w)
    return transient
