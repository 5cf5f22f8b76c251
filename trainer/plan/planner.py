"""The plan: which mode, ZeRO stage, offload, checkpointing and micro-batch fit the hardware.

Pure planning from the model's shape (trainer/plan/memory.py does the arithmetic, trainer/plan/search.py
tries the candidates, trainer/plan/reasons.py explains the choice): no model is built and no weights are
read, so `--plan` answers at once even for gpt2-xl. A Plan keeps its decision (the plan keys), its
accounting (`estimate`, bytes per item) and its explanation (`reasons`) apart.
"""
import dataclasses
from dataclasses import dataclass, field

from trainer.config import MODES
from trainer.plan import reasons as why
from trainer.plan.hardware import USABLE_FRACTION_CPU, USABLE_FRACTION_GPU, Hardware
from trainer.plan.memory import Candidate, Estimate, default_grad_accum
from trainer.plan.search import PLAN_KEYS, PlanError, PlanInput, Search, describe, divisors_desc, fits
from trainer.units import format_bytes

__all__ = ["Plan", "PlanError", "PlanInput", "make_plan", "step_down"]

MAX_SUGGESTED_GPUS = 64
MIN_SUGGESTED_BLOCK = 64


@dataclass(frozen=True)
class Plan:
    # the decision
    mode: str
    zero_stage: int
    offload: str
    gradient_checkpointing: bool
    micro_batch_size: int
    grad_accum_per_rank: int   # micro * accum * n_devices == batch_size * gradient_accumulation_steps
    dtype: str
    optimizer: str             # trainer/config.OPTIMIZERS (a paged one only where CUDA runs)
    grad_accum_dtype: str      # the dtype gradients accumulate in
    activation_offload: bool
    master_weights: str        # trainer/config.MASTER_WEIGHTS: fp32 masters, or the bf16 weights stepped (no copy)
    optimizer_in_backward: bool  # gradient release (trainer/optim/release.py)
    # what it is for
    hardware: Hardware
    usable_bytes: int          # the budget the plan fits in
    block_size: int
    sequences_per_iteration: int
    # its accounting, its estimated speed and its explanation
    estimate: Estimate
    step_time: float           # estimated time per iteration relative to plain full fine-tuning (plan/cost.py)
    reasons: dict[str, str]    # one line per plan key (+ 'budget', and 'step_down' after an out-of-memory error)
    runners_up: list[dict] = field(default_factory=list)  # the candidates that lost, and why (runner_ups)

    @property
    def n_devices(self):
        return self.hardware.n_devices

    @property
    def device_type(self):
        return self.hardware.device_type

    @property
    def tokens_per_iteration(self):
        return self.sequences_per_iteration * self.block_size

    @property
    def candidate(self):
        return Candidate(self.mode, self.zero_stage, self.offload, self.gradient_checkpointing, self.micro_batch_size,
                         self.optimizer, self.grad_accum_dtype, self.activation_offload, self.master_weights,
                         self.optimizer_in_backward)

    def keys(self):
        """The plan keys and their values (what a step-down changes, what plan.json's history records)."""
        return {key: getattr(self, key) for key in PLAN_KEYS}


def _plan(search, scored, reasons, runners_up=()):
    cand = scored.cand
    return Plan(mode=cand.mode, zero_stage=cand.zero_stage, offload=cand.offload,
                gradient_checkpointing=cand.gradient_checkpointing, micro_batch_size=cand.micro_batch_size,
                grad_accum_per_rank=search.per_rank // cand.micro_batch_size, dtype=search.dtype,
                optimizer=cand.optimizer, grad_accum_dtype=cand.grad_accum_dtype,
                activation_offload=cand.activation_offload, master_weights=cand.master_weights,
                optimizer_in_backward=cand.optimizer_in_backward, hardware=search.hw, usable_bytes=search.usable,
                block_size=search.inp.shape.block_size, sequences_per_iteration=search.inp.sequences,
                estimate=scored.est, step_time=scored.time, reasons=reasons, runners_up=list(runners_up))


def make_plan(inp: PlanInput, hw: Hardware) -> Plan:
    """The fastest plan that fits `hw` within the best mode that fits, or PlanError with one line saying what
    would fit."""
    search = Search(inp, hw)
    chosen, others, smallest = search.choose()
    if chosen is None:
        _nothing_fits(search, smallest)
    return _plan(search, chosen, why.explain(search, chosen, others, smallest), runner_ups(search, chosen, others))


RUNNERS_UP = 3  # fitting candidates shown beside the chosen one


def runner_ups(search, chosen, others):
    """The candidates that lost, each with its estimated time, memory and why: the next fastest that fit, the
    fastest that would be faster but does not fit, and the best plan of each lower-quality mode that fits."""
    def row(scored, why_not):
        c = scored.cand
        return {"plan": describe(c), **{k: getattr(c, k) for k in PLAN_KEYS if k != "dtype"},
                "step_time": round(scored.time, 4), "total_bytes": scored.est.total,
                "fits": scored.est.total <= search.usable, "why": why_not}

    rows = [row(s, f"estimated {s.time / chosen.time - 1:+.0%} time") for s in others[:RUNNERS_UP]]
    mode_fixed = "mode" in search.fixed
    faster = [search.score(c) for c in search.candidates(chosen.cand.mode, mode_fixed)]
    faster = [s for s in faster if s.est.total > search.usable and s.time < chosen.time]
    if faster:
        best = min(faster, key=lambda s: s.time)
        rows.append(row(best, f"faster ({best.time / chosen.time - 1:+.0%} time) but needs "
                              f"{format_bytes(best.est.total)} (usable {format_bytes(search.usable)})"))
    if not mode_fixed:
        for mode in MODES[MODES.index(chosen.cand.mode) + 1:]:
            best, _, _ = search.choose([mode])
            if best is not None:
                rows.append(row(best, f"{chosen.cand.mode} fits, and quality comes first (full, then LoRA, then "
                                      f"QLoRA)"))
    return rows


def _nothing_fits(search, smallest):
    inp, hw = search.inp, search.hw
    if not smallest:
        raise PlanError(f"no plan satisfies the fixed keys {search.fixed}; set some of them back to auto")
    need, cand = min(smallest.values(), key=lambda t: t[0])
    gpu = hw.device_type == "cuda"
    if gpu:
        where = f"{format_bytes(search.usable)} usable per GPU ({hw.name})"
        wanted = f"at least {format_bytes(need / USABLE_FRACTION_GPU)} per GPU"
    else:
        where = f"{format_bytes(search.usable)} usable per rank ({hw.name})"
        wanted = f"at least {format_bytes(need * hw.n_devices / USABLE_FRACTION_CPU)} of available system memory"
    options = []
    if "mode" in search.fixed:
        for mode in MODES:
            if mode != search.fixed["mode"] and fits(inp.with_keys(mode=mode), hw):
                options.append(f"--mode={mode} fits")
                break
    relaxable = [k for k in ("zero_stage", "offload", "gradient_checkpointing", "micro_batch_size")
                 if k in search.fixed]
    if relaxable and fits(inp.with_keys(**{k: "auto" for k in relaxable}), hw):
        options.append(f"leaving {', '.join(relaxable)} on auto fits")
    micro = search.fixed.get("micro_batch_size")
    if micro and micro > 1 and fits(inp.with_keys(micro_batch_size=1), hw):
        options.append("--micro_batch_size=1 fits")
    # more CPU ranks would share the same memory, so only GPUs are worth suggesting
    more = [g for g in range(hw.n_devices + 1, MAX_SUGGESTED_GPUS + 1) if gpu and inp.sequences % g == 0]
    for g in more:
        if fits(inp, dataclasses.replace(hw, n_devices=g)):
            options.append(f"--gpus={g} fits")
            break
    block = inp.shape.block_size // 2
    while block >= MIN_SUGGESTED_BLOCK:
        if fits(inp.with_keys(block_size=block), hw):
            options.append(f"--block_size={block} fits")
            break
        block //= 2
    if not options:
        options.append("no other mode, more GPUs (up to 64) or a smaller block_size fits either")
    raise PlanError(f"nothing fits in {where}: the smallest plan ({describe(cand)}) needs {format_bytes(need)}, "
                    f"i.e. {wanted}; options: {'; '.join(options)}")


def step_down(plan: Plan, inp: PlanInput, hw: Hardware, started=False) -> Plan | None:
    """The next plan after an out-of-memory error, or None when nothing is left to give up.

    Order, each only where the user left the key on auto: checkpointing on; activation offload on (GPUs); a
    smaller micro-batch (more accumulation); on several ranks a higher ZeRO stage; 8-bit optimizer states;
    bf16 gradient accumulation; then offload (mode fixed) or the next mode (mode auto). Once an optimizer step
    was taken (`started`) the optimizer and the mode stay: their states cannot be carried into another's.
    What changed is in reasons['step_down'].
    """
    search = Search(inp, hw)
    f = search.fixed
    cur = plan.candidate
    new, what, key = None, None, None

    smaller = [d for d in divisors_desc(search.per_rank) if d < cur.micro_batch_size]
    higher = [z for z in range(cur.zero_stage + 1, 4) if not (cur.mode == "qlora" and z == 3)]
    bf16_buffer = plan.dtype == "bf16" and cur.zero_stage == 0 and cur.offload == "none" \
        and cur.grad_accum_dtype == "fp32"
    bf16_weights = cur.master_weights != "fp32"  # its optimizer runs at ZeRO-0 on the bf16 module only
    if not cur.gradient_checkpointing and "gradient_checkpointing" not in f:
        new, key, what = dataclasses.replace(cur, gradient_checkpointing=True), "gradient_checkpointing", \
            "turned gradient checkpointing on"
    elif cur.gradient_checkpointing and not cur.activation_offload and "activation_offload" not in f \
            and hw.device_type == "cuda":
        new, key, what = dataclasses.replace(cur, activation_offload=True), "activation_offload", \
            "checkpointed activations moved to pinned CPU memory"
    elif smaller and "micro_batch_size" not in f and not cur.optimizer_in_backward:  # (no accumulation)
        m = smaller[0]
        new, key = dataclasses.replace(cur, micro_batch_size=m), "micro_batch_size"
        what = f"micro-batch {cur.micro_batch_size} -> {m}, accumulation {search.per_rank // m} per rank"
    elif hw.n_devices > 1 and cur.offload == "none" and higher and "zero_stage" not in f \
            and not (bf16_buffer and "grad_accum_dtype" in f) and not bf16_weights:
        # ZeRO 1-3 accumulate in the compute dtype (trainer/plan/memory.py: the optimizer paths)
        new, key = dataclasses.replace(cur, zero_stage=higher[0], grad_accum_dtype=default_grad_accum(
            higher[0], cur.offload, plan.dtype)), "zero_stage"
        what = f"ZeRO-{cur.zero_stage} -> ZeRO-{higher[0]}: shards more over {hw.n_devices} ranks"
    elif cur.optimizer == "adamw" and "optimizer" not in f and cur.offload == "none" and not started \
            and not bf16_weights:
        new, key, what = dataclasses.replace(cur, optimizer="adamw8bit"), "optimizer", \
            "AdamW's states 32-bit -> 8-bit (bitsandbytes)"
    elif bf16_buffer and "grad_accum_dtype" not in f:
        new, key, what = dataclasses.replace(cur, grad_accum_dtype="bf16"), "grad_accum_dtype", \
            "gradient accumulation fp32 -> bf16 (no fp32 buffer)"
    elif "mode" in f and "offload" not in f and hw.device_type == "cuda" and cur.offload != "optimizer+params" \
            and not (started and cur.optimizer != "adamw") and not bf16_weights:
        new, key, what = _offload_step(cur, f, plan.dtype)
    if new is None and "mode" not in f and cur.mode != MODES[-1] and not started:
        for mode in MODES[MODES.index(cur.mode) + 1:]:
            chosen, _, _ = search.choose([mode])
            if chosen is not None:
                new, key, what = chosen.cand, "mode", f"{cur.mode} -> {mode} (searched afresh: {describe(chosen.cand)})"
                break
    if new is None:
        return None
    scored = search.score(new)
    reasons = why.explain(search, scored, [], {})
    reasons[key] = f"stepped down after running out of memory: {what}"
    reasons["step_down"] = f"out of memory with {describe(cur)}: {what}"
    return _plan(search, scored, reasons)


def _offload_step(cur, fixed, dtype):
    """ZeRO-Offload: DeepSpeed's CPU Adam steps (an 8-bit optimizer the user did not fix goes back to AdamW),
    gradients accumulate in the compute dtype."""
    zero = fixed.get("zero_stage")
    if fixed.get("optimizer", "adamw") != "adamw" or fixed.get("grad_accum_dtype") == "fp32":
        return None, None, None
    offloaded = {"optimizer": "adamw", "grad_accum_dtype": dtype}
    if cur.offload == "none":
        stage = zero if zero is not None else max(cur.zero_stage, 2)
        if stage >= 1:
            return (dataclasses.replace(cur, offload="optimizer", zero_stage=stage, **offloaded), "offload",
                    f"optimizer states moved to CPU memory (ZeRO-{stage})")
    if cur.mode != "qlora" and zero in (None, 3):
        return (dataclasses.replace(cur, offload="optimizer+params", zero_stage=3, **offloaded), "offload",
                "optimizer states and parameters moved to CPU memory (ZeRO-3)")
    return None, None, None
