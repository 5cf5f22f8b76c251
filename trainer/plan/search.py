"""The search over candidate plans: the planner's input, the candidates in the order they are tried, and
the first one that fits.

Auto mode tries full fine-tuning without offload, then LoRA, then QLoRA; within a mode the lowest ZeRO
stage, checkpointing only if needed and the largest micro-batch that fits. A fixed mode also allows
offload. Keys the user fixed are never changed; the micro-batch and accumulation change, tokens per
iteration never do.
"""
import dataclasses
from dataclasses import dataclass

from trainer.config import MODES, OFFLOADS
from trainer.errors import UserError
from trainer.model.shapes import Shape
from trainer.plan.hardware import Hardware, usable_bytes
from trainer.plan.memory import Candidate, Estimate, estimate

PLAN_KEYS = ("mode", "zero_stage", "offload", "gradient_checkpointing", "micro_batch_size", "dtype")


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
        fixed = {key: cfg[key] for key in PLAN_KEYS if cfg[key] != "auto"}
        return cls(shape, cfg["batch_size"], cfg["gradient_accumulation_steps"], fixed, cfg["lora_r"],
                   tuple(cfg["lora_targets"]), cfg["lora_dropout"], cfg["dropout"], packed, cfg["use_dora"],
                   cfg["loraplus_lr_ratio"] != 1)

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


class Search:
    """The planner's input on one hardware: its dtype, usable memory and sequences per rank, resolved
    once, and the estimate of any candidate."""

    def __init__(self, inp: PlanInput, hw: Hardware):
        n = hw.n_devices
        if inp.sequences % n:
            raise PlanError(f"batch_size x gradient_accumulation_steps = {inp.sequences} sequences per iteration "
                            f"cannot be split evenly over {n} ranks; make it a multiple of {n}")
        self.inp, self.hw, self.fixed = inp, hw, inp.fixed
        self.per_rank = inp.sequences // n
        self.usable = usable_bytes(hw)
        self.dtype = self.fixed.get("dtype") or ("fp32" if hw.device_type == "cpu" else "bf16" if hw.bf16 else "fp16")
        if hw.device_type == "cuda" and self.dtype == "bf16" and not hw.bf16:
            raise PlanError(f"dtype=bf16 but {hw.name} does not support bf16; use dtype=fp16 (loss scaling) or auto")
        if hw.device_type == "cpu" and self.dtype == "fp16":
            raise PlanError("dtype=fp16 needs a GPU; on the CPU use fp32 (auto) or bf16")
        self.check_fixed()

    def estimate(self, cand) -> Estimate:
        inp, hw = self.inp, self.hw
        return estimate(inp.shape, cand, self.dtype, hw.n_devices, hw.device_type, self.usable, inp.lora_r,
                        inp.lora_targets, inp.lora_dropout, inp.dropout, inp.packed, inp.dora, inp.loraplus)

    def check_fixed(self):
        """Combinations of fixed plan keys that cannot work (each key's own values are checked by config)."""
        f = self.fixed
        zero, offload = f.get("zero_stage"), f.get("offload")
        if f.get("mode") == "qlora" and (zero == 3 or offload == "optimizer+params"):
            raise PlanError("QLoRA cannot run with ZeRO-3 (nor parameter offload, which needs it): bitsandbytes' "
                            "4-bit parameters cannot be partitioned by ZeRO-3; use zero_stage 0, 1 or 2")
        if offload == "optimizer+params" and zero not in (None, 3):
            raise PlanError(f"offload=optimizer+params needs ZeRO-3, but zero_stage={zero}; set zero_stage=3 or auto")
        if offload == "optimizer" and zero == 0:
            raise PlanError("offload=optimizer needs ZeRO stage 1, 2 or 3, but zero_stage=0; set zero_stage=auto")
        micro = f.get("micro_batch_size")
        if micro is not None and self.per_rank % micro:
            options = ", ".join(str(d) for d in reversed(divisors_desc(self.per_rank)))
            raise PlanError(f"micro_batch_size={micro} does not divide the {self.per_rank} sequences each rank "
                            f"processes per iteration (batch_size x gradient_accumulation_steps / ranks); "
                            f"use one of {options}")

    # --------------------------------------------------------------------- candidates, fastest first

    def stage_groups(self, mode, offload):
        """ZeRO stages to try, in groups of equal speed: ZeRO-1/2 move the same bytes as plain
        data parallelism, so within (0, 1, 2) the largest micro-batch wins; ZeRO-3 adds half again."""
        zero = self.fixed.get("zero_stage")
        if zero is not None:
            stages = [zero]
        elif offload == "none":
            # on one rank ZeRO shards nothing, so 1-3 only add buckets
            stages = [0] if self.hw.n_devices == 1 else [0, 1, 2, 3]
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

    def offloads(self, mode_fixed):
        offload = self.fixed.get("offload")
        if offload is not None:
            return [offload]
        if mode_fixed and self.hw.device_type == "cuda":
            return list(OFFLOADS)
        return ["none"]  # auto mode prefers a cheaper mode to offload; on a CPU offload saves nothing

    def candidates(self, mode, mode_fixed):
        """Candidates of one mode, fastest first."""
        ckpt = self.fixed.get("gradient_checkpointing")
        ckpts = [ckpt] if ckpt is not None else [False, True]
        micro = self.fixed.get("micro_batch_size")
        micros = [micro] if micro is not None else divisors_desc(self.per_rank)
        for offload in self.offloads(mode_fixed):
            for gc in ckpts:
                for group in self.stage_groups(mode, offload):
                    for m in micros:
                        for zero in group:
                            yield Candidate(mode, zero, offload, gc, m)

    def modes(self):
        mode = self.fixed.get("mode")
        return [mode] if mode else list(MODES)

    def first_fit(self, modes=None):
        """First fitting candidate: (candidate, estimate, smallest per mode) or (None, None, smallest per mode).

        'smallest' maps mode -> (total bytes, candidate) of its least demanding candidate tried.
        """
        mode_fixed = "mode" in self.fixed
        smallest = {}
        for mode in modes or self.modes():
            least = None
            for cand in self.candidates(mode, mode_fixed):
                est = self.estimate(cand)
                if est.total <= self.usable:
                    return cand, est, smallest
                if least is None or est.total <= least[0]:  # ties: the later, leaner candidate
                    least = (est.total, cand)
            if least is not None:
                smallest[mode] = least
        return None, None, smallest

    def smallest_with(self, mode, offload):
        """Least memory any candidate of `mode` needs with the given offload."""
        sub = Search(self.inp.with_keys(offload=offload), self.hw)
        return min((sub.estimate(c).total for c in sub.candidates(mode, True)), default=0)


def fits(inp, hw):
    """Whether any plan fits `hw` (fixed keys that contradict each other: no)."""
    try:
        return Search(inp, hw).first_fit()[0] is not None
    except PlanError:
        return False


def describe(cand):
    """'full, ZeRO-2, checkpointing, micro-batch 4'."""
    parts = [cand.mode, f"ZeRO-{cand.zero_stage}"]
    if cand.offload != "none":
        parts.append(f"offload {cand.offload}")
    if cand.gradient_checkpointing:
        parts.append("checkpointing")
    parts.append(f"micro-batch {cand.micro_batch_size}")
    return ", ".join(parts)
