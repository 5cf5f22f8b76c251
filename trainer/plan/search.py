"""The search over candidate plans: the planner's input, every candidate the keys allow, and the choice.

Quality first, then speed: auto mode tries full fine-tuning, then LoRA, then QLoRA (the quality rule, whenever
one fits), and within the first mode that fits takes the candidate with the lowest estimated time per
iteration (trainer/plan/cost.py), among every combination of ZeRO stage, recomputation, activation offload,
optimizer (32-bit or bitsandbytes' 8-bit AdamW), gradient-accumulation dtype and micro-batch. ZeRO-Offload of
optimizer states (and weights) is considered only when the mode is fixed: it moves the optimizer step to the
CPU, so auto mode prefers a cheaper mode. Keys the user fixed are never changed; the micro-batch and
accumulation change, tokens per iteration never do.
"""
import dataclasses
import functools
import shutil
from dataclasses import dataclass

from trainer.config import MODES, OFFLOADS
from trainer.errors import UserError
from trainer.model.shapes import Shape
from trainer.optim.optimizer import is_client, is_paged, unpaged
from trainer.plan.cost import step_time
from trainer.plan.hardware import Hardware, usable_bytes
from trainer.plan.memory import Candidate, Estimate, default_grad_accum, estimate

PLAN_KEYS = ("mode", "zero_stage", "offload", "gradient_checkpointing", "micro_batch_size", "dtype", "optimizer",
             "grad_accum_dtype", "activation_offload", "master_weights", "optimizer_in_backward")
# paged ones only when asked for: they page out, they do not shrink. adamw4bit (torchao's 4-bit moments) only on
# bf16_sr weights (the candidate loop), where the quality table admits it
AUTO_OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")
# What `auto` may choose for master_weights and optimizer_in_backward: a tool that changes what is learned
# enters only where the quality table (bench/RESULTS.md, bench/optimizer_parity.py) shows it learns as well as
# fp32 masters by the paired rule of docs/plan.md. Plain bf16 rounding fails it and is never chosen.
AUTO_MASTER_WEIGHTS = ("fp32", "bf16_kahan", "bf16_sr")
AUTO_IN_BACKWARD = (False, True)
# ... and the step inside the backward only with the optimizers its quality rows measured (per-tensor clipping)
AUTO_IN_BACKWARD_TOOLS = {("bf16_kahan", "adamw"), ("bf16_sr", "adamw4bit")}


@functools.cache
def has_cxx_compiler():
    """Whether torchao's compiled AdamW (bf16_sr, adamw4bit) can be built on the CPU: once per process, since
    the planner asks for every candidate."""
    return bool(shutil.which("c++") or shutil.which("g++"))


class PlanError(UserError):
    """Nothing fits, or the fixed keys contradict each other: a one-line message for the user
    (a UserError, so the entry points print it as one line and exit non-zero)."""


@dataclass(frozen=True)
class PlanInput:
    """Everything the planner reads, built once (PlanInput.of) from the resolved config and the model's shape."""
    shape: Shape
    batch_size: int
    gradient_accumulation_steps: int
    fixed: dict[str, object]       # plan key -> the user's value; keys left on 'auto' are absent
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    dropout: float
    packed: bool = False           # instruction batches (trainer/data/tokens.py: meta format 'instructions')
    dora: bool = False             # DoRA adapters (use_dora): magnitudes to train, more activations
    loraplus: bool = False         # LoRA+ (loraplus_lr_ratio != 1): B matrices in an optimizer group of their own

    @classmethod
    def of(cls, cfg, shape, packed=False):
        fixed = {key: getattr(cfg, key) for key in PLAN_KEYS if getattr(cfg, key) != "auto"}
        return cls(shape, cfg.batch_size, cfg.gradient_accumulation_steps, fixed, cfg.lora_r,
                   tuple(cfg.lora_targets), cfg.lora_dropout, cfg.dropout, packed, cfg.use_dora,
                   cfg.loraplus_lr_ratio != 1)

    @property
    def sequences(self):
        """Sequences per iteration, over all ranks."""
        return self.batch_size * self.gradient_accumulation_steps

    def with_keys(self, **keys):
        """A copy with plan keys changed ('auto' frees a key) or another block_size."""
        fixed = dict(self.fixed)
        shape = self.shape
        for key, value in keys.items():
            if key == "block_size":
                shape = dataclasses.replace(shape, block_size=value)
            elif value == "auto":
                fixed.pop(key, None)
            else:
                fixed[key] = value
        return dataclasses.replace(self, fixed=fixed, shape=shape)


def divisors_desc(n):
    return [d for d in range(n, 0, -1) if n % d == 0]


@dataclass(frozen=True)
class Scored:
    """A candidate with its accounting and its estimated time per iteration (relative to the plain plan)."""
    cand: Candidate
    est: Estimate
    time: float


def memory_tools(cand):
    """How much of the memory toolbox a candidate uses: equal times go to the simpler plan (a lower ZeRO stage)."""
    bf16_accumulation = cand.grad_accum_dtype == "bf16" and cand.zero_stage == 0 and cand.offload == "none"
    return cand.zero_stage + 2 * (cand.offload != "none") + cand.gradient_checkpointing + cand.activation_offload \
        + (cand.optimizer != "adamw") + bf16_accumulation + (cand.master_weights != "fp32") \
        + cand.optimizer_in_backward


class Search:
    """The planner's input on one hardware: its dtype, usable memory and sequences per rank, resolved
    once, and the estimate and estimated time of any candidate."""

    def __init__(self, inp: PlanInput, hw: Hardware):
        n = hw.n_devices
        if inp.sequences % n:
            raise PlanError(f"batch_size x gradient_accumulation_steps = {inp.sequences} sequences per iteration "
                            f"cannot be split evenly over {n} ranks; make it a multiple of {n}")
        self.inp, self.hw, self.fixed = inp, hw, dict(inp.fixed)
        self.per_rank = inp.sequences // n
        self.usable = usable_bytes(hw)
        self.dtype = self.fixed.get("dtype") or ("fp32" if hw.device_type == "cpu" else "bf16" if hw.bf16 else "fp16")
        if hw.device_type == "cuda" and self.dtype == "bf16" and not hw.bf16:
            raise PlanError(f"dtype=bf16 but {hw.name} does not support bf16; use dtype=fp16 (loss scaling) or auto")
        if hw.device_type == "cpu" and self.dtype == "fp16":
            raise PlanError("dtype=fp16 needs a GPU; on the CPU use fp32 (auto) or bf16")
        # a paged optimizer pages through CUDA's unified memory: nothing to page on a machine without CUDA
        if hw.device_type == "cpu" and is_paged(self.fixed.get("optimizer", "")):
            name = self.fixed["optimizer"]
            raise PlanError(f"optimizer={name} pages its states through CUDA's unified memory and this machine has "
                            f"no CUDA GPU; use optimizer={unpaged(name)} (the same states and updates, not paged)")
        self.check_fixed()

    def estimate(self, cand) -> Estimate:
        inp, hw = self.inp, self.hw
        return estimate(inp.shape, cand, self.dtype, hw.n_devices, hw.device_type, self.usable, inp.lora_r,
                        inp.lora_targets, inp.lora_dropout, inp.dropout, inp.packed, inp.dora, inp.loraplus)

    def score(self, cand) -> Scored:
        return Scored(cand, self.estimate(cand), step_time(self, cand))

    def check_fixed(self):
        """Combinations of fixed plan keys that cannot work (each key's own values are checked by config)."""
        f = self.fixed
        zero, offload, optimizer = f.get("zero_stage"), f.get("offload"), f.get("optimizer")
        if f.get("mode") == "qlora" and (zero == 3 or offload == "optimizer+params"):
            raise PlanError("QLoRA cannot run with ZeRO-3 (nor parameter offload, which needs it): bitsandbytes' "
                            "4-bit parameters cannot be partitioned by ZeRO-3; use zero_stage 0, 1 or 2")
        if offload == "optimizer+params" and zero not in (None, 3):
            raise PlanError(f"offload=optimizer+params needs ZeRO-3, but zero_stage={zero}; set zero_stage=3 or auto")
        if offload == "optimizer" and zero == 0:
            raise PlanError("offload=optimizer needs ZeRO stage 1, 2 or 3, but zero_stage=0; set zero_stage=auto")
        if optimizer and is_client(optimizer) and offload not in (None, "none"):
            raise PlanError(f"optimizer={optimizer} cannot run with offload={offload}: DeepSpeed's ZeRO-Offload steps "
                            f"its own CPU Adam and refuses other optimizers; use --optimizer=adamw (or auto) or "
                            f"--offload=none")
        accum = f.get("grad_accum_dtype")
        if accum and self.dtype != "bf16" and accum != self.dtype:
            raise PlanError(f"grad_accum_dtype={accum} is a choice of bf16 training; with dtype={self.dtype} "
                            f"gradients accumulate in {self.dtype if self.dtype == 'fp32' else 'fp16'}; "
                            f"leave grad_accum_dtype on auto")
        if accum == "fp32" and self.dtype == "bf16" and ((zero or 0) > 0 or offload not in (None, "none")):
            raise PlanError("grad_accum_dtype=fp32 is DeepSpeed's BF16_Optimizer, which this trainer runs at ZeRO-0 "
                            "without offload; ZeRO 1-3 and offload accumulate in bf16: set zero_stage=0 and "
                            "offload=none, or grad_accum_dtype=auto")
        self.check_adam_mini()
        self.check_master_weights()
        self.check_optimizer_in_backward()
        if f.get("activation_offload") and f.get("gradient_checkpointing") is False:
            raise PlanError("activation_offload=True keeps the checkpointed activations in CPU memory, so it needs "
                            "gradient_checkpointing=True (or auto)")
        micro = f.get("micro_batch_size")
        if micro is not None and self.per_rank % micro:
            options = ", ".join(str(d) for d in reversed(divisors_desc(self.per_rank)))
            raise PlanError(f"micro_batch_size={micro} does not divide the {self.per_rank} sequences each rank "
                            f"processes per iteration (batch_size x gradient_accumulation_steps / ranks); "
                            f"use one of {options}")

    def check_adam_mini(self):
        """Adam-mini keeps a second moment per row or tensor of the model's own parameters, by their names
        (trainer/optim/optimizer.py): full mode at ZeRO-0 without offload, on the weights themselves (fp32 in
        fp32 training; bf16 without masters in bf16 training). DeepSpeed's master-weight paths hand an
        optimizer flat partitions, whose rows it cannot see."""
        f = self.fixed
        if f.get("optimizer") != "adam_mini":
            return
        if f.get("mode", "full") != "full":
            raise PlanError(f"optimizer=adam_mini factors the second moments of the model's own matrices, a "
                            f"full-finetuning tool, but mode={f['mode']}; set --mode=full or --optimizer=auto")
        if f.get("zero_stage", 0) != 0 or f.get("offload", "none") != "none":
            raise PlanError(f"optimizer=adam_mini steps whole tensors at ZeRO-0 without offload (ZeRO 1-3 hand it "
                            f"flat partitions, whose rows it cannot see), but zero_stage={f.get('zero_stage', 0)}, "
                            f"offload={f.get('offload', 'none')}; set --zero_stage=0 --offload=none (or auto)")
        if self.dtype == "fp16" or self.dtype == "bf16" and f.get("master_weights") != "bf16":
            raise PlanError(f"optimizer=adam_mini steps the weights themselves (DeepSpeed's {self.dtype} paths hand "
                            f"it flat fp32 masters), but dtype={self.dtype} with master_weights="
                            f"{f.get('master_weights', 'auto')}; set --dtype=fp32, or --dtype=bf16 "
                            f"--master_weights=bf16 (plain rounding, which its quality row measures: bench/RESULTS.md)")

    def check_master_weights(self):
        """bf16 weights without fp32 masters: bf16 training, full mode, ZeRO-0 without offload, their own AdamW
        (the bf16_weights path of trainer/plan/memory.py); torchao's 4-bit AdamW only there, with bf16_sr."""
        f = self.fixed
        masters = f.get("master_weights", "fp32")
        if f.get("optimizer") == "adamw4bit" and masters != "bf16_sr":
            raise PlanError(f"optimizer=adamw4bit is torchao's AdamW4bit, which this trainer runs on bf16 weights "
                            f"with stochastic rounding (one tensor at a time; DeepSpeed's fp32-master paths hand it "
                            f"flat partitions it leaves unquantized), but master_weights={masters}; set "
                            f"--master_weights=bf16_sr --dtype=bf16")
        if masters == "fp32":
            return
        if self.dtype != "bf16":
            raise PlanError(f"master_weights={masters} updates bf16 weights without an fp32 copy, but dtype="
                            f"{self.dtype}; set --dtype=bf16, or --master_weights=fp32 (or auto)")
        if f.get("mode", "full") != "full":
            raise PlanError(f"master_weights={masters} is for full finetuning (adapters are a small share of the "
                            f"memory and keep fp32 masters), but mode={f['mode']}; set --mode=full or "
                            f"--master_weights=auto")
        if f.get("zero_stage", 0) != 0 or f.get("offload", "none") != "none":
            raise PlanError(f"master_weights={masters} runs at ZeRO-0 without offload (DeepSpeed steps a client "
                            f"optimizer on the bf16 module: docs/plan.md), but zero_stage={f.get('zero_stage', 0)}, "
                            f"offload={f.get('offload', 'none')}; set --zero_stage=0 --offload=none (or auto)")
        own = ("adamw", "adamw4bit") + (("adam_mini",) if masters == "bf16" else ())
        if f.get("optimizer", "adamw") not in own:
            raise PlanError(f"master_weights={masters} steps its own AdamW on the bf16 weights, not "
                            f"optimizer={f['optimizer']}; set --optimizer=adamw (or auto)")
        if f.get("grad_accum_dtype", "bf16") != "bf16":
            raise PlanError(f"master_weights={masters} accumulates gradients in the bf16 weights' own .grad, not "
                            f"in fp32; set --grad_accum_dtype=bf16 (or auto)")
        if masters == "bf16_sr" and self.hw.device_type == "cpu" and not has_cxx_compiler():
            raise PlanError("master_weights=bf16_sr steps with torchao's compiled AdamW, which on the CPU needs a C++ "
                            "compiler; install one (apt-get install g++) or use --master_weights=bf16_kahan")

    def check_optimizer_in_backward(self):
        """The step inside the backward (trainer/optim/release.py): the optimizer over the bf16 weights
        (master_weights other than fp32) steps each tensor in a hook, one rank (ZeRO-0's all-reduce would come
        after the hooks stepped un-averaged gradients), no accumulation (a tensor stepped per micro-batch would
        not be the iteration's update)."""
        f = self.fixed
        if not f.get("optimizer_in_backward"):
            return
        masters = f.get("master_weights", "bf16_kahan" if self.dtype == "bf16" else "fp32")
        if masters == "fp32":
            raise PlanError("optimizer_in_backward=True steps the optimizer over the bf16 weights in the backward "
                            "(DeepSpeed's fp32-master optimizers step only whole), but master_weights=fp32; set "
                            "--master_weights=bf16_kahan (or bf16_sr) --dtype=bf16")
        if self.hw.n_devices > 1:
            raise PlanError(f"optimizer_in_backward=True steps each tensor before ZeRO-0's all-reduce would average "
                            f"its gradient over the {self.hw.n_devices} ranks; run on one rank or set "
                            f"--optimizer_in_backward=False")
        if self.per_rank != f.get("micro_batch_size", self.per_rank):
            raise PlanError(f"optimizer_in_backward=True updates the weights in every backward, so it cannot "
                            f"accumulate gradients, but micro_batch_size={f['micro_batch_size']} with "
                            f"{self.per_rank} sequences per iteration accumulates {self.per_rank // f['micro_batch_size']}; "
                            f"set --micro_batch_size={self.per_rank} (or auto) or --optimizer_in_backward=False")

    # --------------------------------------------------------------------- candidates

    def stages(self, mode, offload):
        """ZeRO stages a mode and offload can run with: on one rank ZeRO 1-3 shard nothing (without offload)."""
        zero = self.fixed.get("zero_stage")
        if zero is not None:
            stages = [zero]
        elif offload == "none":
            stages = [0] if self.hw.n_devices == 1 else [0, 1, 2, 3]
        elif offload == "optimizer":
            stages = [2, 3]  # DeepSpeed's ZeRO-Offload (ds_configs/zero2_offload, zero3_offload)
        else:
            stages = [3]
        if mode == "qlora":
            stages = [z for z in stages if z != 3]
        if offload == "optimizer+params":
            return [z for z in stages if z == 3]
        if offload == "optimizer":
            return [z for z in stages if z >= 1]
        return stages

    def offloads(self, mode_fixed):
        offload = self.fixed.get("offload")
        if offload is not None:
            return [offload]
        if mode_fixed and self.hw.device_type == "cuda":
            return list(OFFLOADS)
        return ["none"]  # auto mode prefers a cheaper mode to offload; on a CPU offload saves nothing

    def options(self, key, auto):
        """The values a key may take: the user's, else `auto`'s list."""
        return [self.fixed[key]] if key in self.fixed else list(auto)

    def candidates(self, mode, mode_fixed):
        """Every candidate of one mode the fixed keys allow."""
        cuda = self.hw.device_type == "cuda"
        micros = self.options("micro_batch_size", divisors_desc(self.per_rank))
        masters = self.options("master_weights", self.auto_master_weights())
        for offload in self.offloads(mode_fixed):
            optimizers = self.options("optimizer", ["adamw"] if offload != "none" else AUTO_OPTIMIZERS)
            for ckpt in self.options("gradient_checkpointing", (False, True)):
                for act in self.options("activation_offload", (False, True) if ckpt and cuda else (False,)):
                    if act and not ckpt:
                        continue
                    for zero in self.stages(mode, offload):
                        default = default_grad_accum(zero, offload, self.dtype)
                        accums = self.options("grad_accum_dtype", ("fp32", "bf16") if default == "fp32"
                                              and self.dtype == "bf16" else (default,))
                        for accum in accums:
                            if accum == "fp32" and default != "fp32":
                                continue  # fp32 accumulation needs ZeRO-0 without offload
                            for optimizer in optimizers:
                                for master in masters:
                                    if master != "fp32" and (mode, zero, offload, accum) != ("full", 0, "none", "bf16"):
                                        continue  # the bf16_weights path (check_master_weights)
                                    if not self.optimizer_runs(optimizer, master, mode, zero, offload):
                                        continue
                                    for released in self.in_backward_options(master, optimizer):
                                        # released: the iteration in one micro-batch (none, if a fixed one
                                        # accumulates)
                                        for m in [m for m in micros if m == self.per_rank] if released else micros:
                                            yield Candidate(mode, zero, offload, ckpt, m, optimizer,
                                                            accum if self.dtype == "bf16" else default, act,
                                                            master, released)

    def optimizer_runs(self, optimizer, master, mode, zero, offload):
        """Whether `optimizer` can step this plan's weights: torchao's 4-bit AdamW on bf16_sr weights only;
        Adam-mini on the model's own tensors (check_adam_mini); the other bf16 weights' optimizers AdamW."""
        if optimizer == "adam_mini":
            own = "fp32" if self.dtype == "fp32" else "bf16"
            return (mode, zero, offload, master) == ("full", 0, "none", own)
        if optimizer == "adamw4bit":
            return master == "bf16_sr"
        return master == "fp32" or optimizer == "adamw"

    def auto_master_weights(self):
        """What `auto` may choose for master_weights: the compensated tools in bf16 training (the quality
        rule), bf16_sr only where torchao's compiled step can be built."""
        if self.dtype != "bf16":
            return ("fp32",)
        compiler = self.hw.device_type == "cuda" or has_cxx_compiler()
        return tuple(m for m in AUTO_MASTER_WEIGHTS if m != "bf16_sr" or compiler)

    def in_backward_options(self, master, optimizer):
        """The step inside the backward where it can run (check_optimizer_in_backward): bf16 weights without
        masters, one rank, the iteration in one micro-batch; on auto only with AUTO_IN_BACKWARD_TOOLS."""
        if "optimizer_in_backward" in self.fixed:
            fixed = self.fixed["optimizer_in_backward"]
            return [] if fixed and master == "fp32" else [fixed]
        if (master, optimizer) not in AUTO_IN_BACKWARD_TOOLS or self.hw.n_devices > 1:
            return [False]
        return list(AUTO_IN_BACKWARD)

    def modes(self):
        mode = self.fixed.get("mode")
        if self.fixed.get("master_weights", "fp32") != "fp32" or self.fixed.get("optimizer_in_backward") \
                or self.fixed.get("optimizer") == "adam_mini":
            # bf16 weights without masters, the step in the backward and Adam-mini are full-finetuning tools
            return ["full"]
        return [mode] if mode else list(MODES)

    def choose(self, modes=None):
        """(chosen Scored, the other fitting Scored of its mode fastest first, smallest per mode) or (None, [],
        smallest per mode); 'smallest' maps mode -> (total bytes, candidate) of its least demanding candidate."""
        mode_fixed = "mode" in self.fixed
        smallest = {}
        for mode in modes or self.modes():
            fitting, least = [], None
            for cand in self.candidates(mode, mode_fixed):
                est = self.estimate(cand)
                if est.total <= self.usable:
                    fitting.append(Scored(cand, est, step_time(self, cand)))
                if least is None or est.total <= least[0]:  # ties: the later, leaner candidate
                    least = (est.total, cand)
            if fitting:
                fitting.sort(key=lambda s: (round(s.time, 6), memory_tools(s.cand), s.est.total))
                return fitting[0], fitting[1:], smallest
            if least is not None:
                smallest[mode] = least
        return None, [], smallest

    def first_fit(self, modes=None):
        """Whether anything fits, as fast as possible: the first fitting candidate, or None."""
        mode_fixed = "mode" in self.fixed
        for mode in modes or self.modes():
            for cand in self.candidates(mode, mode_fixed):
                if self.estimate(cand).total <= self.usable:
                    return cand
        return None

    def least_with(self, mode, **keys):
        """Least memory any candidate of `mode` needs with these keys fixed (0 if they contradict)."""
        try:
            sub = Search(self.inp.with_keys(**keys), self.hw)
        except PlanError:
            return 0
        return min((sub.estimate(c).total for c in sub.candidates(mode, True)), default=0)


def fits(inp, hw):
    """Whether any plan fits `hw` (fixed keys that contradict each other: no)."""
    try:
        return Search(inp, hw).first_fit() is not None
    except PlanError:
        return False


def describe(cand):
    """'full, ZeRO-2, checkpointing, micro-batch 4, adamw8bit'."""
    parts = [cand.mode, f"ZeRO-{cand.zero_stage}"]
    if cand.offload != "none":
        parts.append(f"offload {cand.offload}")
    if cand.gradient_checkpointing:
        parts.append("checkpointing")
    if cand.activation_offload:
        parts.append("activation offload")
    parts.append(f"micro-batch {cand.micro_batch_size}")
    if cand.optimizer != "adamw":
        parts.append(cand.optimizer)
    if cand.master_weights != "fp32":
        parts.append(f"{cand.master_weights} weights (no fp32 masters)")
        if cand.optimizer_in_backward:
            parts.append("step in the backward")
    elif cand.grad_accum_dtype == "bf16" and cand.zero_stage == 0 and cand.offload == "none":
        parts.append("bf16 accumulation")
    return ", ".join(parts)
