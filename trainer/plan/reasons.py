"""Why the plan is what it is: one line per plan key, one small function per key.

Each function reads the search (its input, hardware and estimates) and the chosen candidate; a key the
user fixed says so. `explain` gathers them into the plan's `reasons` (printed with the plan, saved in
plan.json).
"""
import dataclasses

from trainer.config import MODES
from trainer.plan.hardware import USABLE_FRACTION_CPU, USABLE_FRACTION_GPU
from trainer.plan.search import divisors_desc
from trainer.units import format_bytes

USER = "fixed by the user"
SHARDED = {1: "optimizer states", 2: "optimizer states and gradients", 3: "weights, gradients and optimizer states"}


def _need(search, cand):
    return format_bytes(search.estimate(cand).total)


def _ranks(n):
    return f"{n} rank{'s' if n > 1 else ''}"


def mode(search, cand, smallest):
    est = search.estimate(cand)
    trainable, total = est.params_trainable, est.params_total
    share = f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"
    if "mode" in search.fixed:
        return f"{USER}; {share}"
    if cand.mode == "full":
        return f"full fine-tuning fits (auto tries full, then LoRA, then QLoRA); {share}"
    if smallest:
        tried = ", ".join(f"{m} needs at least {format_bytes(smallest[m][0])}" for m in MODES if m in smallest)
        return f"{tried} (usable {format_bytes(search.usable)}); {cand.mode}: {share}"
    return f"auto: {cand.mode}; {share}"


def zero_stage(search, cand):
    n = search.hw.n_devices
    if "zero_stage" in search.fixed:
        return USER
    if cand.offload != "none":
        which = "parameter offload needs stage 3" if cand.offload == "optimizer+params" else "lowest such stage"
        return f"ZeRO-{cand.zero_stage}: offload runs with DeepSpeed's ZeRO-Offload ({which})"
    if cand.zero_stage == 0:
        return "1 rank: ZeRO 1-3 shard across ranks and would save nothing" if n == 1 else \
            "plain data parallelism fits"
    lower = dataclasses.replace(cand, zero_stage=cand.zero_stage - 1)
    return (f"lowest stage that fits: ZeRO-{cand.zero_stage - 1} would need {_need(search, lower)} "
            f"(usable {format_bytes(search.usable)}); ZeRO-{cand.zero_stage} shards {SHARDED[cand.zero_stage]} "
            f"over {n} ranks")


def offload(search, cand):
    if "offload" in search.fixed:
        return USER
    if cand.offload == "none":
        return ("not needed: model states fit on the GPU" if search.hw.device_type == "cuda"
                else "none: on a CPU-only machine offloading to CPU memory saves nothing")
    prev = "none" if cand.offload == "optimizer" else "optimizer"
    return (f"nothing fits with offload={prev} (at least {format_bytes(search.smallest_with(cand.mode, prev))}); "
            f"{format_bytes(search.estimate(cand).host)} of states per rank go to CPU memory")


def gradient_checkpointing(search, cand):
    if "gradient_checkpointing" in search.fixed:
        return USER
    if not cand.gradient_checkpointing:
        return "off: activations fit without recomputation"
    off = dataclasses.replace(cand, gradient_checkpointing=False, micro_batch_size=1)
    return (f"on: without it even micro-batch 1 needs {_need(search, off)} (usable {format_bytes(search.usable)}); "
            f"costs about a third more compute")


def micro_batch_size(search, cand):
    m, accum = cand.micro_batch_size, search.per_rank // cand.micro_batch_size
    split = (f"{m} x {accum} accumulation x {_ranks(search.hw.n_devices)} = {search.inp.sequences} sequences "
             f"per iteration")
    if "micro_batch_size" in search.fixed:
        return f"{USER}; {split}"
    larger = [d for d in divisors_desc(search.per_rank) if d > m]
    if not larger:
        return f"the whole iteration in one micro-batch; {split}"
    nxt = dataclasses.replace(cand, micro_batch_size=larger[-1])
    return f"largest that fits ({larger[-1]} would need {_need(search, nxt)}); {split}"


def grad_accum_per_rank(search, cand):
    return f"keeps tokens per iteration at {search.inp.sequences * search.inp.shape.block_size:,}"


def dtype(search, cand):
    if "dtype" in search.fixed:
        return USER
    if search.hw.device_type == "cpu":
        return "fp32: training on the CPU"
    if search.dtype == "bf16":
        return "bf16: supported by the GPU"
    return "fp16 with dynamic loss scaling: this GPU has no bf16"


def budget(search):
    hw = search.hw
    if hw.device_type == "cuda":
        gpus = f"{hw.n_devices} GPU{'s' if hw.n_devices > 1 else ''}"
        return (f"usable = {USABLE_FRACTION_GPU:.0%} of {format_bytes(hw.bytes_per_device)} per GPU ({hw.name}), "
                f"{gpus}")
    return (f"no GPU: the budget is system memory, {USABLE_FRACTION_CPU:.0%} of {format_bytes(hw.bytes_per_device)} "
            f"available per rank ({_ranks(hw.n_devices)})")


def explain(search, cand, smallest):
    """One line per plan key saying why it has its value (and the budget)."""
    return {"mode": mode(search, cand, smallest), "zero_stage": zero_stage(search, cand),
            "offload": offload(search, cand), "gradient_checkpointing": gradient_checkpointing(search, cand),
            "micro_batch_size": micro_batch_size(search, cand),
            "grad_accum_per_rank": grad_accum_per_rank(search, cand), "dtype": dtype(search, cand),
            "budget": budget(search)}
