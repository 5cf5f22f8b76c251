"""Why the plan is what it is: one line per plan key, one small function per key.

Each function reads the search (its input, hardware and estimates), the chosen candidate with its estimated
time, and the other candidates of its mode that fit (fastest first); a key the user fixed says so. Where
another value of the key would also fit, the line says how much slower the best such plan is estimated to be
(trainer/plan/cost.py); where none fits, how much memory the value would need. `explain` gathers them into
the plan's `reasons` (printed with the plan, saved in plan.json).
"""
import dataclasses
import functools

from trainer.config import MODES
from trainer.optim.optimizer import is_8bit, unpaged
from trainer.plan.hardware import USABLE_FRACTION_CPU, USABLE_FRACTION_GPU
from trainer.plan.search import AUTO_IN_BACKWARD_TOOLS, describe, divisors_desc
from trainer.units import format_bytes

USER = "fixed by the user"
SHARDED = {1: "optimizer states", 2: "optimizer states and gradients", 3: "weights, gradients and optimizer states"}


def _need(search, cand):
    return format_bytes(search.estimate(cand).total)


def _ranks(n):
    return f"{n} rank{'s' if n > 1 else ''}"


def _usable(search):
    return f"usable {format_bytes(search.usable)}"


def _slower(chosen, other):
    return f"estimated {other.time / chosen.time - 1:+.0%} time ({describe(other.cand)})"


def _needs(search, cand, **change):
    """'<bytes> (usable <bytes>)': what the plan would need with `change`, beside the budget."""
    return f"{_need(search, dataclasses.replace(cand, **change))} ({_usable(search)})"


def _unless_fixed(reason):
    """A key the user fixed needs no other reason: its line says so."""
    @functools.wraps(reason)
    def line(search, chosen, others):
        return USER if reason.__name__ in search.fixed else reason(search, chosen, others)
    return line


def _also_fits(chosen, others, key, label):
    """'; <label> also fits, estimated +N% time (...)' for the fastest fitting plan with another value of key."""
    value = getattr(chosen.cand, key)
    other = next((s for s in others if getattr(s.cand, key) != value), None)
    return f"; {label(getattr(other.cand, key))} also fits, {_slower(chosen, other)}" if other else ""


def mode(search, chosen, others, smallest):
    cand, est = chosen.cand, chosen.est
    share = (f"{est.params_trainable:,} of {est.params_total:,} parameters train "
             f"({100 * est.params_trainable / est.params_total:.2f}%)")
    if "mode" in search.fixed:
        return f"{USER}; {share}"
    if cand.mode == "full":
        return f"full fine-tuning fits (auto tries full, then LoRA, then QLoRA: quality first); {share}"
    if smallest:
        tried = ", ".join(f"{m} needs at least {format_bytes(smallest[m][0])}" for m in MODES if m in smallest)
        return f"{tried} ({_usable(search)}); {cand.mode}: {share}"
    return f"auto: {cand.mode}; {share}"


@_unless_fixed
def zero_stage(search, chosen, others):
    cand, n = chosen.cand, search.hw.n_devices
    if cand.offload != "none":
        which = "parameter offload needs stage 3" if cand.offload == "optimizer+params" else "lowest such stage"
        return f"ZeRO-{cand.zero_stage}: offload runs with DeepSpeed's ZeRO-Offload ({which})"
    if cand.zero_stage == 0:
        if n == 1:
            return "1 rank: ZeRO 1-3 shard across ranks and would save nothing"
        sharded = " (DeepSpeed's BF16_Optimizer shards the fp32 masters and optimizer states over the ranks)" \
            if cand.grad_accum_dtype == "fp32" and search.dtype == "bf16" else ""
        return "plain data parallelism fits" + sharded + _also_fits(chosen, others, "zero_stage",
                                                                    lambda z: f"ZeRO-{z}")
    lower = [s for s in others if s.cand.zero_stage < cand.zero_stage]
    if lower:
        return (f"ZeRO-{cand.zero_stage} shards {SHARDED[cand.zero_stage]} over {n} ranks; "
                f"ZeRO-{lower[0].cand.zero_stage}"
                f" also fits, {_slower(chosen, lower[0])}")
    return (f"lowest stage that fits: ZeRO-{cand.zero_stage - 1} would need "
            f"{_needs(search, cand, zero_stage=cand.zero_stage - 1)}; "
            f"ZeRO-{cand.zero_stage} shards {SHARDED[cand.zero_stage]} over {n} ranks")


@_unless_fixed
def offload(search, chosen, others):
    cand = chosen.cand
    if cand.offload == "none":
        return ("not needed: model states fit on the GPU" if search.hw.device_type == "cuda"
                else "none: on a CPU-only machine offloading to CPU memory saves nothing")
    prev = "none" if cand.offload == "optimizer" else "optimizer"
    return (f"nothing fits with offload={prev} (at least {format_bytes(search.least_with(cand.mode, offload=prev))}); "
            f"{format_bytes(chosen.est.host)} of states per rank go to CPU memory")


@_unless_fixed
def gradient_checkpointing(search, chosen, others):
    cand = chosen.cand
    if not cand.gradient_checkpointing:
        return "off: activations fit without recomputation"
    without = [s for s in others if not s.cand.gradient_checkpointing]
    if without:
        return (f"on: recomputing the forward pass costs less than the smaller micro-batches that fit without it "
                f"({describe(without[0].cand)}: estimated {without[0].time / chosen.time - 1:+.0%} time)")
    if cand.optimizer_in_backward:  # the step in the backward takes the whole iteration in one micro-batch
        off = _needs(search, cand, gradient_checkpointing=False, activation_offload=False)
        return (f"on: without it the iteration's micro-batch of {cand.micro_batch_size} (the step in the backward "
                f"cannot accumulate) needs {off}; recomputation costs about a third more compute")
    off = _needs(search, cand, gradient_checkpointing=False, activation_offload=False, micro_batch_size=1)
    return (f"on: without it even micro-batch 1 needs {off}; "
            f"recomputation costs about a third more compute")


def activation_offload(search, chosen, others):
    cand = chosen.cand
    if "activation_offload" in search.fixed:
        return USER + ("" if search.hw.device_type == "cuda" or not cand.activation_offload else
                       "; on a CPU-only machine it moves activations within the same memory")
    if not cand.gradient_checkpointing:
        return "off: it offloads the checkpointed activations, and checkpointing is off"
    if search.hw.device_type == "cpu":
        return "off: on a CPU-only machine there is no other memory to move activations to"
    if not cand.activation_offload:
        return "off: the checkpointed activations fit on the GPU" + _also_fits(
            chosen, others, "activation_offload", lambda on: "offloading them")
    kept = dataclasses.replace(cand, activation_offload=False)
    return (f"on: with the checkpointed activations on the GPU the plan needs {_need(search, kept)}; "
            f"{format_bytes(chosen.est.host)} wait in pinned CPU memory, copied on a side stream")


def micro_batch_size(search, chosen, others):
    cand = chosen.cand
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


def grad_accum_per_rank(search, chosen, others):
    return f"keeps tokens per iteration at {search.inp.sequences * search.inp.shape.block_size:,}"


@_unless_fixed
def dtype(search, chosen, others):
    if search.hw.device_type == "cpu":
        return "fp32: training on the CPU"
    if search.dtype == "bf16":
        return "bf16: supported by the GPU"
    return "fp16 with dynamic loss scaling: this GPU has no bf16"


@_unless_fixed
def optimizer(search, chosen, others):
    cand = chosen.cand
    if cand.optimizer == "adamw4bit":
        return (f"adamw4bit: with 32-bit states the plan needs {_needs(search, cand, optimizer='adamw')}; torchao's "
                f"block-wise 4-bit moments ({format_bytes(chosen.est.items['optimizer_states'])}) on the bf16_sr "
                f"weights, which learn as fp32 masters do by the quality table (bench/RESULTS.md)")
    if not is_8bit(cand.optimizer):
        return "adamw: 32-bit states fit" + _also_fits(chosen, others, "optimizer", lambda o: o)
    states = format_bytes(chosen.est.items["optimizer_states"])
    full = _needs(search, cand, optimizer=unpaged(cand.optimizer).replace("8bit", ""))
    return (f"{cand.optimizer}: with 32-bit states the plan needs {full}; "
            f"bitsandbytes' block-wise 8-bit moments ({states} with the fp32 masters)")


@_unless_fixed
def grad_accum_dtype(search, chosen, others):
    cand = chosen.cand
    if search.dtype != "bf16":
        return f"{cand.grad_accum_dtype}: gradients accumulate in the training dtype"
    if cand.zero_stage > 0 or cand.offload != "none":
        return "bf16: DeepSpeed's ZeRO optimizer accumulates in the compute dtype"
    if cand.master_weights != "fp32":
        return "bf16: the bf16 weights' gradients accumulate in their own .grad (no fp32 masters, no fp32 buffer)"
    if cand.grad_accum_dtype == "fp32":
        return ("fp32: DeepSpeed's BF16_Optimizer adds each bf16 gradient into an fp32 buffer (4 bytes per "
                "parameter) and steps once, fused" + _also_fits(chosen, others, "grad_accum_dtype", lambda d: d))
    return (f"bf16: with the fp32 buffer the plan needs {_needs(search, cand, grad_accum_dtype='fp32')}; bf16 "
            f"gradients (2 bytes per parameter), copied to fp32 only at the step (FP16_UnfusedOptimizer)")


def master_weights(search, chosen, others):
    cand = chosen.cand
    if "master_weights" in search.fixed:
        if cand.master_weights == "fp32":
            return USER
        return (f"{cand.master_weights}: fixed by the user; no fp32 copy of the weights (the bf16 weights and "
                f"{format_bytes(chosen.est.items['optimizer_states'])} of optimizer states, trainer/optim/"
                f"optimizer.py), DeepSpeed ZeRO-0 steps the client optimizer on the bf16 module")
    if search.dtype != "bf16" or cand.mode != "full":
        return "fp32: the weights the optimizer updates are fp32 (masters in 16-bit training)"
    if cand.master_weights == "fp32":
        return ("fp32: DeepSpeed keeps fp32 master weights" +
                _also_fits(chosen, others, "master_weights", lambda m: f"{m} weights (no masters)"))
    how = "Kahan summation (torch-optimi)" if cand.master_weights == "bf16_kahan" else \
        "stochastic rounding (torchao)"
    masters = next((s for s in others if s.cand.master_weights == "fp32"), None)
    instead = f"fp32 masters also fit, {_slower(chosen, masters)}" if masters else \
        f"with fp32 masters the plan needs {_needs(search, cand, master_weights='fp32', optimizer_in_backward=False)}"
    return (f"{cand.master_weights}: {instead}; the bf16 weights updated with {how}, which learn as fp32 masters "
            f"do by the quality table (bench/RESULTS.md, docs/plan.md's paired rule); "
            f"{format_bytes(chosen.est.items['optimizer_states'])} of optimizer states")


def optimizer_in_backward(search, chosen, others):
    cand = chosen.cand
    if "optimizer_in_backward" in search.fixed:
        if not cand.optimizer_in_backward:
            return USER
        return ("on: fixed by the user; each tensor stepped in the backward as its gradient completes, so no "
                "gradient is held (one micro-batch per iteration, gradients clipped per tensor: docs/plan.md)")
    if cand.optimizer_in_backward:
        return (f"on: with the ordinary step the plan needs "
                f"{_needs(search, cand, optimizer_in_backward=False)}; each tensor stepped in the backward as "
                f"its gradient completes (no gradient held; one micro-batch per iteration, gradients clipped per "
                f"tensor, a host sync per tensor: docs/plan.md)")
    if cand.master_weights == "fp32" or search.hw.n_devices > 1:
        return "off: it runs on bf16 weights without masters, on one rank only"
    if (cand.master_weights, cand.optimizer) not in AUTO_IN_BACKWARD_TOOLS:
        measured = ", ".join(f"{m} with {o}" for m, o in sorted(AUTO_IN_BACKWARD_TOOLS))
        return (f"off: auto takes it only with the tools its quality rows measured ({measured}), not "
                f"{cand.master_weights} with {cand.optimizer}")
    return "off: the ordinary step fits" + _also_fits(chosen, others, "optimizer_in_backward",
                                                       lambda on: "the step in the backward" if on else "off")


def budget(search):
    hw = search.hw
    if hw.device_type == "cuda":
        gpus = f"{hw.n_devices} GPU{'s' if hw.n_devices > 1 else ''}"
        return (f"usable = {USABLE_FRACTION_GPU:.0%} of {format_bytes(hw.bytes_per_device)} per GPU ({hw.name}), "
                f"{gpus}")
    return (f"no GPU: the budget is system memory, {USABLE_FRACTION_CPU:.0%} of {format_bytes(hw.bytes_per_device)} "
            f"available per rank ({_ranks(hw.n_devices)})")


def step_time(search, chosen, others):
    faster = "" if not others else f"; the next fastest that fits is {_slower(chosen, others[0])}"
    return (f"estimated {chosen.time:.2f}x the time per iteration of plain full fine-tuning (no memory tool, one "
            f"micro-batch: trainer/plan/cost.py){faster}")


KEYS = (zero_stage, offload, gradient_checkpointing, activation_offload, micro_batch_size, grad_accum_per_rank,
        dtype, optimizer, grad_accum_dtype, master_weights, optimizer_in_backward, step_time)


def explain(search, chosen, others, smallest):
    """One line per plan key saying why it has its value (and the budget and the estimated time)."""
    reasons = {"mode": mode(search, chosen, others, smallest)}
    reasons.update({key.__name__: key(search, chosen, others) for key in KEYS})
    reasons["budget"] = budget(search)
    return reasons
