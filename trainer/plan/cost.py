"""The cost model: an estimated time per iteration for each candidate plan, relative to the plain plan.

The plain plan is full fine-tuning of the same model and batch with no memory tool: ZeRO-0, no recomputation,
32-bit AdamW, fp32 gradient accumulation, nothing offloaded, the whole iteration in one micro-batch (it need
not fit). Every constant below is written once, with its source; docs/plan.md lists them. The planner keeps
the quality rule (full before LoRA before QLoRA, whenever one fits) and, within the first mode that fits,
takes the fastest candidate.

On a GPU the candidate's compute is the plain plan's scaled by what it changes, plus what it moves over PCIe
or between GPUs that the compute cannot hide:

    time = compute x mode x recompute x optimizer  +  micro-steps x fixed cost  +  exposed transfers and
           communication

On the CPU every term is in seconds measured on this project's machine:

    time = tokens x FLOPs per token / CPU_FLOPS  +  QLoRA's dequantization per micro-step  +  the optimizer
           step per trained parameter  +  per extra micro-step a fixed cost and the gradients' accumulation
"""
from trainer.model.shapes import flops_per_token, recompute_flops_per_token
from trainer.optim.optimizer import is_8bit
from trainer.plan.hardware import gpu_model, peak_flops
from trainer.plan.memory import DTYPE_BYTES, Candidate, parameter_counts, path_of, trained_tensors

# ---------------------------------------------------------------------------------------------------------
# On the CPU (one memory, nothing to move) every term is measured here, in CPU seconds of one thread
# (python bench/step_costs.py, GPT-2 124M at block 128; bench/RESULTS.md, "Costs of the memory tools on this
# CPU", 2026-12-02): the passes' FLOPs at CPU_FLOPS (LoRA's FLOPs count, 4N + 6N_adapters, says 0.682x full's
# passes, measured 0.692x; recomputation's count 1.231x, measured 1.223x), QLoRA's dequantization of each
# 4-bit weight once per micro-step, the optimizer step per trained parameter, and per extra micro-step a
# fixed cost and the addition of each trained parameter's gradient into the accumulated one.
CPU_FLOPS = 1.16e11
CPU_DEQUANT_SECONDS = 2.07e-9          # per 4-bit weight and micro-step
# per trained parameter: torch's AdamW, bitsandbytes' CPU kernel; in bf16 training (2026-12-07) DeepSpeed's
# BF16_Optimizer on the fp32 masters, and without masters torch-optimi's Kahan AdamW, torchao's AdamW with
# stochastic rounding and its AdamW4bit (compiled for the CPU), and optimi's step inside the backward (the
# passes' extra time with it, against bf16_kahan's passes)
CPU_STEP_SECONDS = {"adamw": 5.32e-9, "adamw8bit": 2.23e-8, "bf16_masters": 1.33e-8, "bf16_kahan": 2.90e-9,
                    "bf16_sr": 1.41e-8, "adamw4bit": 4.41e-8, "in_backward": 3.41e-9}
CPU_MICRO_STEP_SECONDS = 0.187         # per micro-step
CPU_ACCUMULATE_SECONDS = 1.83e-9       # per trained parameter and micro-step after the first
# On GPUs LoRA's cost is its FLOPs count, and QLORA_OVER_LORA_GPU stands for the dequantization (the QLoRA
# paper and peft's reports put 4-bit LoRA at about a third slower than 16-bit LoRA; bench/gpu_check.py
# measures it when a GPU is lent). Each micro-step pays a fixed time besides its compute (kernel launches
# and Python of an eager GPT-2 forward and backward, DeepSpeed's bookkeeping): an assumption to calibrate
# with gpu_check.
QLORA_OVER_LORA_GPU = 1.33
GPU_MICRO_STEP_SECONDS = 0.015
# bitsandbytes' 8-bit AdamW against 32-bit: torchtune's published ablation (full fine-tuning of a 3B model,
# each flag added to the previous) measured -4.7% tokens/s for 8-bit AdamW; scaled by the trained share of
# the parameters (the optimizer of a LoRA run steps ~1% of them).
EIGHT_BIT_COST = 0.049
# torchao's 4-bit AdamW: its published benchmark (Llama-2-7B, full bf16 fine-tuning on one A100, torchao's
# optim README) measured about 9% fewer tokens/s than fused AdamW; scaled like 8-bit's.
FOUR_BIT_COST = 0.09
# bf16 weights without fp32 masters (bf16_kahan, bf16_sr): no cost. torch-optimi's README reports pure bf16
# training with Kahan summation up to 10% faster than mixed precision at the same batch size; the gain is not
# counted, so a plan keeps fp32 masters wherever they fit at the same estimated time (fewer tools on ties).
MASTERLESS_COST = 0.0
# The step inside the backward: per trained tensor one host sync (its gradient's norm, for the non-finite
# check: trainer/optim/release.py) and a Python hook between backward kernels. An assumption to calibrate with
# bench/gpu_check.py's toolbox step.
RELEASE_SECONDS_PER_TENSOR = 5e-5
# FP16_UnfusedOptimizer (bf16 accumulation at ZeRO-0): a Python loop and a host sync per parameter tensor and
# an fp32 copy of every gradient at each step (trainer/plan/memory.py). An assumption, scaled like 8-bit's.
UNFUSED_COST = 0.10
# ---------------------------------------------------------------------------------------------------------
# Transfers. A GPU is assumed to sustain this share of its dense 16-bit peak (trainer/plan/hardware.PEAK_FLOPS)
# on GPT-2 training, to turn FLOPs into seconds where compute and copies compete.
MFU_ASSUMED = 0.40
REFERENCE_PEAK_FLOPS = 312e12  # a GPU of unknown model (--vram_gb): an A100's dense bf16 peak
# Host<->GPU bandwidth per direction: PCIe 4.0 x16 moves 31.5 GB/s and PCIe 5.0 x16 63 GB/s (PCI-SIG); about
# 80% of it is sustained by pinned copies. H100 and H200 sit on PCIe 5.0; every other GPU here on 4.0.
PCIE_BYTES_PER_S = {"gen4": 25e9, "gen5": 50e9}
PCIE5_MODELS = ("h100", "h200")
# GPU<->GPU all-reduce bandwidth: NVLink on SXM parts (A100 SXM 300 GB/s, H100/H200 SXM 450 GB/s per
# direction, NVIDIA datasheets), PCIe between the others. Half of the gradient reduction is assumed hidden
# behind the backward pass (DeepSpeed's overlap_comm buckets), half of ZeRO-3's gathers behind prefetching.
NVLINK_BYTES_PER_S = {"a100": 300e9, "h100": 450e9, "h200": 450e9}
COMM_EXPOSED = 0.5
# DeepSpeed's CPU Adam streams about 28 bytes per parameter (fp32 weight, gradient, two moments read; weight
# and moments written): at ~56 GB/s of host memory bandwidth, 2e9 parameters per second.
CPU_ADAM_PARAMS_PER_S = 2e9
# ---------------------------------------------------------------------------------------------------------


def _hardware(search):
    """(peak FLOP/s, PCIe bytes/s, GPU-to-GPU bytes/s) of the GPU planned for; a GPU of unknown model counts as
    an A100 on PCIe 4.0."""
    peak, _ = peak_flops(search.hw.name)
    model, variant = gpu_model(search.hw.name)
    pcie = PCIE_BYTES_PER_S["gen5" if model in PCIE5_MODELS else "gen4"]
    nvlink = NVLINK_BYTES_PER_S.get(model) if variant in ("sxm", "") and model in NVLINK_BYTES_PER_S else None
    return peak or REFERENCE_PEAK_FLOPS, pcie, nvlink or pcie


def _quantized_weights(shape):
    """The 4-bit weights of a QLoRA run: the blocks' four projections."""
    return shape.n_layer * 12 * shape.n_embd ** 2


def _cpu_seconds(search, cand):
    """The candidate's iteration in CPU seconds (every term measured by bench/step_costs.py)."""
    inp, shape = search.inp, search.inp.shape
    _, trainable, total = parameter_counts(shape, cand.mode, inp.lora_r, inp.lora_targets)
    flops = flops_per_token(total, shape.n_layer, shape.n_head, shape.n_embd, shape.block_size, cand.mode, trainable)
    if cand.gradient_checkpointing:
        flops += recompute_flops_per_token(shape.n_layer, shape.n_embd, shape.block_size)
    micro_steps = search.per_rank // cand.micro_batch_size
    seconds = search.per_rank * shape.block_size * flops / CPU_FLOPS
    if cand.mode == "qlora":
        seconds += micro_steps * _quantized_weights(shape) * CPU_DEQUANT_SECONDS
    seconds += micro_steps * CPU_MICRO_STEP_SECONDS + (micro_steps - 1) * trainable * CPU_ACCUMULATE_SECONDS
    return seconds + trainable * CPU_STEP_SECONDS[_cpu_step(search, cand)]


def _cpu_step(search, cand):
    """Which measured optimizer step a candidate runs on the CPU (the keys of CPU_STEP_SECONDS)."""
    if cand.optimizer == "adam_mini":
        # counted as torch's per-tensor AdamW, the step it resembles (one moment fewer): bench/step_costs.py's
        # first round on fp32 weights, under load, gave 0.60 s against AdamW's 0.69 (GPT-2 124M). It is chosen
        # only when asked for, so this ranks only candidates that all run it
        return "adamw"
    if cand.optimizer_in_backward and cand.master_weights == "bf16_kahan":
        return "in_backward"  # optimi's gradient release, measured
    if cand.optimizer == "adamw4bit":
        return "adamw4bit"  # also in the backward: the same per-tensor steps, each from a hook
    if cand.master_weights != "fp32":
        # plain bf16 (torch's AdamW per tensor on the bf16 weights, never chosen by auto) is not measured: it
        # is counted as Kahan's step, the other per-tensor bf16 AdamW
        return cand.master_weights if cand.master_weights in CPU_STEP_SECONDS else "bf16_kahan"
    if is_8bit(cand.optimizer):
        return "adamw8bit"
    # fp32 masters in bf16 training (BF16_Optimizer, measured; FP16_UnfusedOptimizer counted the same)
    return "bf16_masters" if search.dtype == "bf16" else "adamw"


def _compute_share(search, cand, plain_flops):
    """Compute of the candidate's iteration against the plain plan's on a GPU: its mode, recomputation,
    optimizer."""
    inp, shape = search.inp, search.inp.shape
    base, trainable, total = parameter_counts(shape, cand.mode, inp.lora_r, inp.lora_targets)
    flops = flops_per_token(total, shape.n_layer, shape.n_head, shape.n_embd, shape.block_size, cand.mode,
                            trainable)
    mode = flops / plain_flops * (QLORA_OVER_LORA_GPU if cand.mode == "qlora" else 1.0)
    recompute = 1.0
    if cand.gradient_checkpointing:
        recompute += recompute_flops_per_token(shape.n_layer, shape.n_embd, shape.block_size) / flops
    trained_share = trainable / base
    optimizer = 1.0 + (EIGHT_BIT_COST * trained_share if is_8bit(cand.optimizer) else 0.0)
    optimizer += FOUR_BIT_COST * trained_share if cand.optimizer == "adamw4bit" else 0.0
    optimizer += MASTERLESS_COST * trained_share if cand.master_weights != "fp32" else 0.0
    if path_of(cand, search.dtype) == "unfused" and search.dtype == "bf16":
        optimizer += UNFUSED_COST * trained_share
    return mode * recompute * optimizer


def step_time(search, cand):
    """The candidate's estimated time per iteration, relative to the plain plan (see the module docstring)."""
    inp, shape, hw = search.inp, search.inp.shape, search.hw
    if hw.device_type == "cpu":
        plain = Candidate("full", 0, "none", False, search.per_rank)
        return _cpu_seconds(search, cand) / _cpu_seconds(search, plain)
    base, _, _ = parameter_counts(shape, "full", inp.lora_r, inp.lora_targets)
    plain_flops = flops_per_token(base, shape.n_layer, shape.n_head, shape.n_embd, shape.block_size)
    share = _compute_share(search, cand, plain_flops)
    tokens = search.per_rank * shape.block_size  # this rank's tokens per iteration
    n, micro_steps = hw.n_devices, search.per_rank // cand.micro_batch_size
    overhead = GPU_MICRO_STEP_SECONDS
    peak, pcie, link = _hardware(search)
    plain_s = tokens * plain_flops / (peak * MFU_ASSUMED)
    compute_s = share * plain_s
    w = DTYPE_BYTES[search.dtype]
    _, trainable, total = parameter_counts(shape, cand.mode, inp.lora_r, inp.lora_targets)
    exposed = micro_steps * overhead
    if cand.optimizer_in_backward:
        exposed += len(trained_tensors(shape, cand.mode, inp.lora_r, inp.lora_targets)) * RELEASE_SECONDS_PER_TENSOR
    if cand.activation_offload:
        # each layer's input goes to host memory in the forward pass and back in the backward pass, on a side
        # stream: only what the compute cannot cover costs time
        moved = 2 * shape.n_layer * w * tokens * shape.n_embd
        exposed += max(0.0, moved / pcie - compute_s)
    if cand.offload != "none":
        # ZeRO-Offload: gradients to the host and weights back each iteration, then CPU Adam; with parameter
        # offload the weights also come over for every micro-step's forward and backward
        exposed += 2 * w * trainable / n / pcie + trainable / n / CPU_ADAM_PARAMS_PER_S
        if cand.offload == "optimizer+params":
            exposed += 2 * micro_steps * w * total / n / pcie
    if n > 1:
        ring = (n - 1) / n
        exposed += COMM_EXPOSED * 2 * w * trainable * ring / link  # the gradient reduction
        if cand.zero_stage == 3:  # weights gathered in every micro-step's forward and backward
            exposed += COMM_EXPOSED * 2 * micro_steps * w * total * ring / link
    return (compute_s + exposed) / (plain_s + overhead)
