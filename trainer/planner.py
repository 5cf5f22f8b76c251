"""The plan: which mode, ZeRO stage, offload, checkpointing and micro-batch fit the hardware.

Pure planning from the model's shape (trainer/memory_model.py does the arithmetic): no
model is built and no weights are read, so `--plan` answers at once even for gpt2-xl.
torch is imported only to detect a GPU, and not at all when --vram_gb is given.

Search in auto mode (docs/plan.md): full fine-tuning without offload, then LoRA,
then QLoRA; within a mode the lowest ZeRO stage, checkpointing only if needed and the
largest micro-batch that fits. A fixed mode also allows offload. Keys the user fixed are
never changed; the micro-batch and accumulation change, tokens per iteration never do.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import MODES, OFFLOADS
from trainer.errors import UserError
from trainer.memory_model import (GPT2_SHAPES, GPT2_VOCAB, USABLE_FRACTION_CPU,
                                  USABLE_FRACTION_GPU, Candidate, GiB, MiB, Shape, estimate, padded_vocab,
                                  parameter_counts)

__all__ = ["Hardware", "Plan", "PlanError", "detect_hardware", "run_shape", "make_plan", "step_down", "format_plan",
           "plan_to_dict"]

PLAN_KEYS = ("mode", "zero_stage", "offload", "gradient_checkpointing", "micro_batch_size", "dtype")
SHARDED = {1: "optimizer states", 2: "optimizer states and gradients", 3: "weights, gradients and optimizer states"}
MAX_SUGGESTED_GPUS = 64
MIN_SUGGESTED_BLOCK = 64


class PlanError(UserError):
    """Nothing fits, or the fixed keys contradict each other: a one-line message for the user
    (a UserError, so the entry points print it as one line and exit non-zero)."""


@dataclass
class Hardware:
    device_type: str          # 'cuda' or 'cpu'
    bytes_per_device: int     # total memory per GPU, or this rank's share of available system memory
    n_devices: int            # data-parallel ranks
    bf16: bool                # bf16 supported (cuda only)
    name: str                 # e.g. 'NVIDIA H100 80GB' or 'CPU (no GPU): system memory'


@dataclass
class Plan:
    mode: str
    zero_stage: int
    offload: str
    gradient_checkpointing: bool
    micro_batch_size: int
    grad_accum_per_rank: int   # micro * accum * n_devices == batch_size * gradient_accumulation_steps
    dtype: str
    n_devices: int
    params_total: int
    params_trainable: int
    memory: dict               # bytes per device per item (trainer/memory_model.MEMORY_ITEMS)
    total_bytes: int           # estimated peak per device
    usable_bytes: int
    reasons: dict              # one line per plan key (+ 'budget', and 'step_down' after an OOM)
    hardware: str
    allocated_bytes: int = 0   # peak of live tensors, comparable with torch.cuda.max_memory_allocated
    host_bytes: int = 0        # CPU memory per rank that offload needs
    device_bytes: int = 0
    device_type: str = "cuda"
    block_size: int = 0
    sequences_per_iteration: int = 0
    tokens_per_iteration: int = 0
    zero_buckets: dict = field(default_factory=dict)  # bucket sizes (elements) for zero_optimization
    model_states: dict = field(default_factory=dict)  # weights/gradients/optimizer states held between steps


# ----------------------------------------------------------------------------- hardware

def _available_system_memory():
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cuda_properties():
    """(name, total bytes, bf16 tensor cores) of this rank's GPU, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    props = torch.cuda.get_device_properties(index)
    # bf16 tensor cores from compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also counts
    # emulation and says True on V100 (7.0) and T4 (7.5), which must train in fp16 with loss scaling
    return props.name, int(props.total_memory), torch.cuda.get_device_capability(index) >= (8, 0)


def detect_hardware(world_size, vram_gb=None, gpus=None):
    """The hardware to plan for. `vram_gb` (GiB, as nvidia-smi counts) and `gpus` override detection."""
    n = int(gpus) if gpus else max(1, int(world_size or 1))
    if vram_gb is not None:
        return Hardware("cuda", int(float(vram_gb) * GiB), n, True, f"GPU with {float(vram_gb):g} GB (--vram_gb)")
    props = _cuda_properties()
    if props is not None:
        name, total, bf16 = props
        return Hardware("cuda", total, n, bf16, name)
    available = _available_system_memory()
    shared = f", shared by {n} ranks" if n > 1 else ""
    return Hardware("cpu", available // n, n, False,
                    f"CPU (no GPU): system memory, {available / GiB:.1f} GiB available{shared}")


def usable_bytes(hw):
    fraction = USABLE_FRACTION_GPU if hw.device_type == "cuda" else USABLE_FRACTION_CPU
    return int(hw.bytes_per_device * fraction)


# ----------------------------------------------------------------------------- shape

def run_shape(cfg, data_vocab_size, model_config_path=None):
    """The model's shape for the planner, without building the model or reading weights.

    A hub name has GPT-2's published shape; a local Hugging Face directory (or, on resume, the
    run's model_config.json) is read as JSON; a scratch model pads the data's vocabulary as
    trainer/model.py does. Only json is needed, so `--plan` stays fast.
    """
    init_from = cfg["init_from"]
    if model_config_path is not None or (init_from not in GPT2_SHAPES and init_from != "scratch"):
        path = Path(model_config_path or Path(init_from) / "config.json")
        if not path.is_file():
            raise UserError(f"init_from={init_from!r} is neither scratch, resume, a GPT-2 hub name "
                            f"({', '.join(GPT2_SHAPES)}) nor a Hugging Face model directory with config.json")
        hf = json.loads(path.read_text())
        return {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"],
                "vocab_size": hf["vocab_size"]}
    if init_from in GPT2_SHAPES:
        n_layer, n_head, n_embd = GPT2_SHAPES[init_from]
        return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "vocab_size": GPT2_VOCAB}
    return {"n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "n_embd": cfg["n_embd"],
            "vocab_size": padded_vocab(data_vocab_size)}


# ----------------------------------------------------------------------------- config

def _fixed(cfg, key):
    """The user's value for a plan key, or None for 'auto' (trainer/config.py has checked its type and range)."""
    value = cfg[key]
    return None if value == "auto" else value


def _divisors_desc(n):
    return [d for d in range(n, 0, -1) if n % d == 0]


def fmt_bytes(n):
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


@dataclass
class _Context:
    """Everything the search needs, resolved once from cfg and hardware."""
    cfg: dict
    hw: Hardware
    shape: Shape
    sequences: int            # sequences per iteration (all ranks)
    per_rank: int
    dtype: str
    usable: int
    fixed: dict               # plan key -> user's value (absent when 'auto')
    lora_r: int
    lora_targets: tuple
    lora_dropout: float
    dropout: float
    packed: bool = False      # instruction batches (trainer/data.py: meta format 'instructions')

    def estimate(self, cand):
        return estimate(self.shape, cand, self.dtype, self.hw.n_devices, self.hw.device_type, self.usable,
                        self.lora_r, self.lora_targets, self.lora_dropout, self.dropout, self.packed)


def _context(cfg, hw, **overrides):
    cfg = {**cfg, **overrides}
    n = hw.n_devices
    sequences = cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    if sequences % n:
        raise PlanError(f"batch_size x gradient_accumulation_steps = {sequences} sequences per iteration cannot be "
                        f"split evenly over {n} ranks; make it a multiple of {n}")
    fixed = {k: v for k in PLAN_KEYS if (v := _fixed(cfg, k)) is not None}
    dtype = fixed.get("dtype") or ("fp32" if hw.device_type == "cpu" else "bf16" if hw.bf16 else "fp16")
    if hw.device_type == "cuda" and dtype == "bf16" and not hw.bf16:
        raise PlanError(f"dtype=bf16 but {hw.name} does not support bf16; use dtype=fp16 (loss scaling) or auto")
    if hw.device_type == "cpu" and dtype == "fp16":
        raise PlanError("dtype=fp16 needs a GPU; on the CPU use fp32 (auto) or bf16")
    shape = Shape(cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"], cfg["block_size"])
    ctx = _Context(cfg, hw, shape, sequences, sequences // n, dtype, usable_bytes(hw), fixed,
                   cfg["lora_r"], tuple(cfg["lora_targets"]), cfg["lora_dropout"], cfg["dropout"],
                   cfg.get("packed", False))  # from the dataset, like the shape keys (run_shape); not a recipe key
    _check_fixed(ctx)
    return ctx


def _check_fixed(ctx):
    """Combinations of fixed plan keys that cannot work (each key's own values are checked by config)."""
    f = ctx.fixed
    zero, offload = f.get("zero_stage"), f.get("offload")
    if f.get("mode") == "qlora" and (zero == 3 or offload == "optimizer+params"):
        raise PlanError("QLoRA cannot run with ZeRO-3 (nor parameter offload, which needs it): bitsandbytes' "
                        "4-bit parameters cannot be partitioned by ZeRO-3; use zero_stage 0, 1 or 2")
    if offload == "optimizer+params" and zero not in (None, 3):
        raise PlanError(f"offload=optimizer+params needs ZeRO-3, but zero_stage={zero}; set zero_stage=3 or auto")
    if offload == "optimizer" and zero == 0:
        raise PlanError("offload=optimizer needs ZeRO stage 1, 2 or 3, but zero_stage=0; set zero_stage=auto")
    micro = f.get("micro_batch_size")
    if micro is not None and ctx.per_rank % micro:
        options = ", ".join(str(d) for d in reversed(_divisors_desc(ctx.per_rank)))
        raise PlanError(f"micro_batch_size={micro} does not divide the {ctx.per_rank} sequences each rank "
                        f"processes per iteration (batch_size x gradient_accumulation_steps / ranks); "
                        f"use one of {options}")


# ----------------------------------------------------------------------------- search

def _stage_groups(ctx, mode, offload):
    """ZeRO stages to try, in groups of equal speed: ZeRO-1/2 move the same bytes as plain
    data parallelism, so within (0, 1, 2) the largest micro-batch wins; ZeRO-3 adds half again."""
    zero = ctx.fixed.get("zero_stage")
    if zero is not None:
        stages = [zero]
    elif offload == "none":
        # on one rank ZeRO shards nothing, so 1-3 only add buckets
        stages = [0] if ctx.hw.n_devices == 1 else [0, 1, 2, 3]
    elif offload == "optimizer":
        stages = [2, 3]  # DeepSpeed's ZeRO-Offload (ds_configs/zero2_offload, zero3_offload)
    else:
        stages = [3]
    if mode == "qlora":
        stages = [z for z in stages if z != 3]
    if offload == "optimizer+params":
        stages = [z for z in stages if z == 3]
    elif offload == "optimizer":
        stages = [z for z in stages if z >= 1]
    groups = [[z for z in stages if z < 3], [z for z in stages if z == 3]]
    return [g for g in groups if g]


def _offloads(ctx, mode_fixed):
    offload = ctx.fixed.get("offload")
    if offload is not None:
        return [offload]
    if mode_fixed and ctx.hw.device_type == "cuda":
        return list(OFFLOADS)
    return ["none"]  # auto mode prefers a cheaper mode to offload; on a CPU offload saves nothing


def _candidates(ctx, mode, mode_fixed):
    """Candidates of one mode, fastest first."""
    ckpt = ctx.fixed.get("gradient_checkpointing")
    ckpts = [ckpt] if ckpt is not None else [False, True]
    micro = ctx.fixed.get("micro_batch_size")
    micros = [micro] if micro is not None else _divisors_desc(ctx.per_rank)
    for offload in _offloads(ctx, mode_fixed):
        for gc in ckpts:
            for group in _stage_groups(ctx, mode, offload):
                for m in micros:
                    for zero in group:
                        yield Candidate(mode, zero, offload, gc, m)


def _modes(ctx):
    mode = ctx.fixed.get("mode")
    return [mode] if mode else list(MODES)


def _search(ctx, modes=None):
    """First fitting candidate: (candidate, estimate, smallest per mode) or (None, None, smallest per mode).

    'smallest' maps mode -> (total bytes, candidate) of its least demanding candidate tried.
    """
    mode_fixed = "mode" in ctx.fixed
    smallest = {}
    for mode in modes or _modes(ctx):
        least = None
        for cand in _candidates(ctx, mode, mode_fixed):
            est = ctx.estimate(cand)
            if est.total <= ctx.usable:
                return cand, est, smallest
            if least is None or est.total <= least[0]:  # ties: the later, leaner candidate
                least = (est.total, cand)
        if least is not None:
            smallest[mode] = least
    return None, None, smallest


def _describe(cand):
    parts = [cand.mode, f"ZeRO-{cand.zero_stage}"]
    if cand.offload != "none":
        parts.append(f"offload {cand.offload}")
    if cand.gradient_checkpointing:
        parts.append("checkpointing")
    parts.append(f"micro-batch {cand.micro_batch_size}")
    return ", ".join(parts)


def _fits_with(cfg, hw, **overrides):
    try:
        ctx = _context(cfg, hw, **overrides)
    except PlanError:
        return False
    return _search(ctx)[0] is not None


def _nothing_fits(ctx, smallest):
    cfg, hw = ctx.cfg, ctx.hw
    if not smallest:
        raise PlanError(f"no plan satisfies the fixed keys {ctx.fixed}; set some of them back to auto")
    need, cand = min(smallest.values(), key=lambda t: t[0])
    gpu = hw.device_type == "cuda"
    if gpu:
        where = f"{fmt_bytes(ctx.usable)} usable per GPU ({hw.name})"
        wanted = f"at least {fmt_bytes(need / USABLE_FRACTION_GPU)} per GPU"
    else:
        where = f"{fmt_bytes(ctx.usable)} usable per rank ({hw.name})"
        wanted = f"at least {fmt_bytes(need * hw.n_devices / USABLE_FRACTION_CPU)} of available system memory"
    options = []
    if "mode" in ctx.fixed:
        for mode in MODES:
            if mode != ctx.fixed["mode"] and _fits_with(cfg, hw, mode=mode):
                options.append(f"--mode={mode} fits")
                break
    relaxable = [k for k in ("zero_stage", "offload", "gradient_checkpointing", "micro_batch_size")
                 if k in ctx.fixed]
    if relaxable and _fits_with(cfg, hw, **{k: "auto" for k in relaxable}):
        options.append(f"leaving {', '.join(relaxable)} on auto fits")
    micro = ctx.fixed.get("micro_batch_size")
    if micro and micro > 1 and _fits_with(cfg, hw, micro_batch_size=1):
        options.append("--micro_batch_size=1 fits")
    # more CPU ranks would share the same memory, so only GPUs are worth suggesting
    more = [g for g in range(hw.n_devices + 1, MAX_SUGGESTED_GPUS + 1) if gpu and ctx.sequences % g == 0]
    for g in more:
        if _fits_with(cfg, dataclasses.replace(hw, n_devices=g)):
            options.append(f"--gpus={g} fits")
            break
    block = ctx.shape.block_size // 2
    while block >= MIN_SUGGESTED_BLOCK:
        if _fits_with(cfg, hw, block_size=block):
            options.append(f"--block_size={block} fits")
            break
        block //= 2
    if not options:
        options.append("no other mode, more GPUs (up to 64) or a smaller block_size fits either")
    raise PlanError(f"nothing fits in {where}: the smallest plan ({_describe(cand)}) needs {fmt_bytes(need)}, "
                    f"i.e. {wanted}; options: {'; '.join(options)}")


# ----------------------------------------------------------------------------- plans

def _plan(ctx, cand, est, reasons):
    _, trainable, total_params = parameter_counts(ctx.shape, cand.mode, ctx.lora_r, ctx.lora_targets)
    return Plan(mode=cand.mode, zero_stage=cand.zero_stage, offload=cand.offload,
                gradient_checkpointing=cand.gradient_checkpointing, micro_batch_size=cand.micro_batch_size,
                grad_accum_per_rank=ctx.per_rank // cand.micro_batch_size, dtype=ctx.dtype,
                n_devices=ctx.hw.n_devices, params_total=total_params, params_trainable=trainable,
                memory=dict(est.items), total_bytes=est.total, usable_bytes=ctx.usable, reasons=reasons,
                hardware=ctx.hw.name, allocated_bytes=est.allocated, host_bytes=est.host,
                device_bytes=ctx.hw.bytes_per_device, device_type=ctx.hw.device_type,
                block_size=ctx.shape.block_size, sequences_per_iteration=ctx.sequences,
                tokens_per_iteration=ctx.sequences * ctx.shape.block_size, zero_buckets=dict(est.buckets),
                model_states=dict(est.states))


def _need(ctx, cand):
    return fmt_bytes(ctx.estimate(cand).total)


def _reasons(ctx, cand, smallest):
    """One line per plan key saying why it has its value."""
    hw, n, f = ctx.hw, ctx.hw.n_devices, ctx.fixed
    user = "fixed by the user"
    usable = fmt_bytes(ctx.usable)
    r = {}
    _, trainable, total = parameter_counts(ctx.shape, cand.mode, ctx.lora_r, ctx.lora_targets)
    share = f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"

    if "mode" in f:
        r["mode"] = f"{user}; {share}"
    elif cand.mode == "full":
        r["mode"] = f"full fine-tuning fits (auto tries full, then LoRA, then QLoRA); {share}"
    elif smallest:
        tried = ", ".join(f"{m} needs at least {fmt_bytes(smallest[m][0])}" for m in MODES if m in smallest)
        r["mode"] = f"{tried} (usable {usable}); {cand.mode}: {share}"
    else:
        r["mode"] = f"auto: {cand.mode}; {share}"

    if "zero_stage" in f:
        r["zero_stage"] = user
    elif cand.offload != "none":
        which = "parameter offload needs stage 3" if cand.offload == "optimizer+params" else "lowest such stage"
        r["zero_stage"] = f"ZeRO-{cand.zero_stage}: offload runs with DeepSpeed's ZeRO-Offload ({which})"
    elif cand.zero_stage == 0:
        r["zero_stage"] = ("1 rank: ZeRO 1-3 shard across ranks and would save nothing" if n == 1
                           else "plain data parallelism fits")
    else:
        lower = dataclasses.replace(cand, zero_stage=cand.zero_stage - 1)
        sharded = SHARDED[cand.zero_stage]
        r["zero_stage"] = (f"lowest stage that fits: ZeRO-{cand.zero_stage - 1} would need {_need(ctx, lower)} "
                           f"(usable {usable}); ZeRO-{cand.zero_stage} shards {sharded} over {n} ranks")

    if "offload" in f:
        r["offload"] = user
    elif cand.offload == "none":
        r["offload"] = ("not needed: model states fit on the GPU" if hw.device_type == "cuda"
                        else "none: on a CPU-only machine offloading to CPU memory saves nothing")
    else:
        prev = "none" if cand.offload == "optimizer" else "optimizer"
        r["offload"] = (f"nothing fits with offload={prev} (at least {fmt_bytes(_smallest_with(ctx, cand, prev))}); "
                        f"{fmt_bytes(ctx.estimate(cand).host)} of states per rank go to CPU memory")

    if "gradient_checkpointing" in f:
        r["gradient_checkpointing"] = user
    elif not cand.gradient_checkpointing:
        r["gradient_checkpointing"] = "off: activations fit without recomputation"
    else:
        off = dataclasses.replace(cand, gradient_checkpointing=False, micro_batch_size=1)
        r["gradient_checkpointing"] = (f"on: without it even micro-batch 1 needs {_need(ctx, off)} "
                                       f"(usable {usable}); costs about a third more compute")

    m, accum = cand.micro_batch_size, ctx.per_rank // cand.micro_batch_size
    split = f"{m} x {accum} accumulation x {n} rank{'s' if n > 1 else ''} = {ctx.sequences} sequences per iteration"
    if "micro_batch_size" in f:
        r["micro_batch_size"] = f"{user}; {split}"
    else:
        larger = [d for d in _divisors_desc(ctx.per_rank) if d > m]
        if larger:
            nxt = dataclasses.replace(cand, micro_batch_size=larger[-1])
            r["micro_batch_size"] = f"largest that fits ({larger[-1]} would need {_need(ctx, nxt)}); {split}"
        else:
            r["micro_batch_size"] = f"the whole iteration in one micro-batch; {split}"
    r["grad_accum_per_rank"] = f"keeps tokens per iteration at {ctx.sequences * ctx.shape.block_size:,}"

    if "dtype" in f:
        r["dtype"] = user
    elif hw.device_type == "cpu":
        r["dtype"] = "fp32: training on the CPU"
    elif ctx.dtype == "bf16":
        r["dtype"] = "bf16: supported by the GPU"
    else:
        r["dtype"] = "fp16 with dynamic loss scaling: this GPU has no bf16"

    if hw.device_type == "cuda":
        r["budget"] = (f"usable = {USABLE_FRACTION_GPU:.0%} of {fmt_bytes(hw.bytes_per_device)} per GPU "
                       f"({hw.name}), {n} GPU{'s' if n > 1 else ''}")
    else:
        r["budget"] = (f"no GPU: the budget is system memory, {USABLE_FRACTION_CPU:.0%} of "
                       f"{fmt_bytes(hw.bytes_per_device)} available per rank ({n} rank{'s' if n > 1 else ''})")
    return r


def _smallest_with(ctx, cand, offload):
    """Least memory any candidate of cand's mode needs with the given offload."""
    sub = dataclasses.replace(ctx, fixed={**ctx.fixed, "offload": offload})
    best = None
    for c in _candidates(sub, cand.mode, True):
        total = sub.estimate(c).total
        best = total if best is None else min(best, total)
    return best or 0


def make_plan(cfg, hw):
    """The fastest plan that fits `hw`, or PlanError with one line saying what would fit."""
    ctx = _context(cfg, hw)
    cand, est, smallest = _search(ctx)
    if cand is None:
        _nothing_fits(ctx, smallest)
    return _plan(ctx, cand, est, _reasons(ctx, cand, smallest))


def step_down(plan, cfg, hw):
    """The next plan after an out-of-memory error, or None when nothing is left to give up.

    Order: checkpointing on; a smaller micro-batch (more accumulation); on several ranks a
    higher ZeRO stage; then offload (mode fixed) or the next mode (mode auto). Keys the user
    fixed are never changed. What changed is in reasons['step_down'].
    """
    ctx = _context(cfg, hw)
    f = ctx.fixed
    cur = Candidate(plan.mode, plan.zero_stage, plan.offload, plan.gradient_checkpointing, plan.micro_batch_size)
    was = _describe(cur)
    new, what, key = None, None, None

    smaller = [d for d in _divisors_desc(ctx.per_rank) if d < cur.micro_batch_size]
    higher = [z for z in range(cur.zero_stage + 1, 4) if not (cur.mode == "qlora" and z == 3)]
    if not cur.gradient_checkpointing and "gradient_checkpointing" not in f:
        new, key, what = dataclasses.replace(cur, gradient_checkpointing=True), "gradient_checkpointing", \
            "turned gradient checkpointing on"
    elif smaller and "micro_batch_size" not in f:
        m = smaller[0]
        new, key = dataclasses.replace(cur, micro_batch_size=m), "micro_batch_size"
        what = f"micro-batch {cur.micro_batch_size} -> {m}, accumulation {ctx.per_rank // m} per rank"
    elif hw.n_devices > 1 and cur.offload == "none" and higher and "zero_stage" not in f:
        new, key = dataclasses.replace(cur, zero_stage=higher[0]), "zero_stage"
        what = f"ZeRO-{cur.zero_stage} -> ZeRO-{higher[0]}: shards more over {hw.n_devices} ranks"
    elif "mode" in f and "offload" not in f and hw.device_type == "cuda" and cur.offload != "optimizer+params":
        new, key, what = _offload_step(cur, f)
    if new is None and "mode" not in f and cur.mode != MODES[-1]:
        for mode in MODES[MODES.index(cur.mode) + 1:]:
            cand, est, _ = _search(ctx, [mode])
            if cand is not None:
                new, key, what = cand, "mode", f"{cur.mode} -> {mode} (searched afresh: {_describe(cand)})"
                break
    if new is None:
        return None
    est = ctx.estimate(new)
    reasons = _reasons(ctx, new, {})
    reasons[key] = f"stepped down after running out of memory: {what}"
    reasons["step_down"] = f"out of memory with {was}: {what}"
    return _plan(ctx, new, est, reasons)


def _offload_step(cur, fixed):
    zero = fixed.get("zero_stage")
    if cur.offload == "none":
        stage = zero if zero is not None else max(cur.zero_stage, 2)
        if stage >= 1:
            return (dataclasses.replace(cur, offload="optimizer", zero_stage=stage), "offload",
                    f"optimizer states moved to CPU memory (ZeRO-{stage})")
    if cur.mode != "qlora" and zero in (None, 3):
        return (dataclasses.replace(cur, offload="optimizer+params", zero_stage=3), "offload",
                "optimizer states and parameters moved to CPU memory (ZeRO-3)")
    return None, None, None


# ----------------------------------------------------------------------------- output

def plan_to_dict(plan):
    """The plan as plain JSON-able data (for --plan --json and out_dir/plan.json)."""
    d = dataclasses.asdict(plan)
    d["fits"] = plan.total_bytes <= plan.usable_bytes
    return d


_PHASE_NOTE = {
    "activations": "forward/backward",
    "logits_and_loss": "forward/backward",
    "optimizer_step_transient": "optimizer step, after activations are freed",
    "offloaded_to_host": "offload on a CPU-only machine stays in the same memory",
}


def format_plan(plan):
    """A human-readable plan: keys, per-item memory, usable memory and the reason for each choice."""
    n = plan.n_devices
    lines = [f"plan for {plan.hardware} ({plan.device_type}, {n} rank{'s' if n > 1 else ''})"]
    values = {"mode": plan.mode, "zero_stage": plan.zero_stage, "offload": plan.offload,
              "gradient_checkpointing": "on" if plan.gradient_checkpointing else "off",
              "micro_batch_size": plan.micro_batch_size, "grad_accum_per_rank": plan.grad_accum_per_rank,
              "dtype": plan.dtype}
    for key, value in values.items():
        lines.append(f"  {key:<24}{value!s:<12}{plan.reasons.get(key, '')}")
    lines.append(f"  {'parameters':<24}{plan.params_total:,} total, {plan.params_trainable:,} trainable")
    lines.append(f"  {'tokens per iteration':<24}{plan.tokens_per_iteration:,} "
                 f"({plan.sequences_per_iteration} sequences of {plan.block_size})")
    lines.append("memory per device (estimated):")
    for item, value in plan.memory.items():
        if item == "offloaded_to_host" and not value:
            continue
        note = _PHASE_NOTE.get(item, "")
        lines.append(f"  {item:<28}{fmt_bytes(value):>12}  {note}")
    lines.append(f"  {'peak':<28}{fmt_bytes(plan.total_bytes):>12}  states + buckets + max(forward/backward, "
                 f"optimizer step) + context and fragmentation")
    lines.append(f"  {'usable':<28}{fmt_bytes(plan.usable_bytes):>12}  {plan.reasons.get('budget', '')}")
    if plan.host_bytes and plan.device_type == "cuda":
        lines.append(f"  {'CPU memory for offload':<28}{fmt_bytes(plan.host_bytes):>12}  per rank")
    if "step_down" in plan.reasons:
        lines.append(f"step-down: {plan.reasons['step_down']}")
    return "\n".join(lines)
