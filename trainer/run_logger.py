"""What a run shows: console lines, a progress bar with ETA, TensorBoard and optionally W&B (rank 0 only).

TensorBoard is the default. With wandb_log=True the same scalars go to Weights & Biases under the same
tags, samples as HTML, and the config, plan and DeepSpeed config as the W&B run's config; every launch
(a resume too) is a new W&B run named after the out_dir (or wandb_run_name).
"""
import html
import json
import re
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.errors import UserError

# Dense (not 2:4-sparsity) bf16/fp16 tensor-core FLOP/s with fp32 accumulation, per GPU model and variant,
# each from the vendor's datasheet or architecture whitepaper (which print the sparsity figure as twice this).
# Matched on whole words of torch.cuda.get_device_name() (gpu_model): an H100 PCIe is not an H100 SXM.
PEAK_FLOPS = {
    ("h200", "sxm"): (989.4e12, "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity (H200 SXM)"),
    ("h200", "nvl"): (835.5e12, "NVIDIA H200 datasheet: BF16 1,671 TFLOPS with sparsity (H200 NVL)"),
    ("h100", "sxm"): (989.4e12, "NVIDIA H100 datasheet: BF16 1,979 TFLOPS with sparsity (H100 SXM)"),
    ("h100", "pcie"): (756.5e12, "NVIDIA H100 datasheet: BF16 1,513 TFLOPS with sparsity (H100 PCIe)"),
    ("h100", "nvl"): (835.5e12, "NVIDIA H100 NVL datasheet: BF16 1,671 TFLOPS with sparsity, per GPU"),
    ("a100", ""): (312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (SXM and PCIe alike)"),
    ("a10", ""): (125e12, "NVIDIA A10 datasheet: BF16 125 TFLOPS dense (250 with sparsity)"),
    ("a10g", ""): (70e12, "AWS A10G (G5): no NVIDIA datasheet; 70 TFLOPS dense bf16 as AWS and NVIDIA quote it "
                          "for G5 instances (approximate)"),
    ("l40s", ""): (362.05e12, "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity"),
    ("l40", ""): (181.05e12, "NVIDIA L40 datasheet: BF16 362.1 TFLOPS with sparsity"),
    ("l4", ""): (121e12, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity"),
    ("4090", ""): (165.2e12, "NVIDIA Ada Lovelace whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate "
                             "165.2 TFLOPS dense"),
    ("3090", ""): (71e12, "NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16/BF16 tensor with FP32 accumulate "
                          "71 TFLOPS dense"),
    ("v100", "sxm"): (125e12, "NVIDIA V100 datasheet: tensor performance 125 TFLOPS (SXM2, fp16)"),
    ("v100", "pcie"): (112e12, "NVIDIA V100 datasheet: tensor performance 112 TFLOPS (PCIe, fp16)"),
    ("v100s", "pcie"): (130e12, "NVIDIA V100S datasheet: tensor performance 130 TFLOPS (PCIe, fp16)"),
    ("t4", ""): (65e12, "NVIDIA T4 datasheet: mixed-precision (FP16/FP32) 65 TFLOPS"),
}
# Words of a device name that pick a variant; an H100/H200 without one is the SXM part ("NVIDIA H100 80GB HBM3").
_VARIANT_WORDS = {"pcie": "pcie", "nvl": "nvl", "sxm": "sxm", "sxm2": "sxm", "sxm3": "sxm", "sxm4": "sxm",
                  "sxm5": "sxm", "hbm3": "sxm", "hbm3e": "sxm"}
# Words that name a different part than the table's (an RTX 3090 Ti, a 4090 D, ...): no guess is made.
_OTHER_PART_WORDS = {"ti", "d", "super", "laptop", "mobile", "max", "q"}
_MODELS = {model for model, _ in PEAK_FLOPS}


def gpu_model(name):
    """(model, variant) of a CUDA device name in PEAK_FLOPS's terms, or (None, why not)."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    models = [w for w in words if w in _MODELS]
    if not models:
        return None, f"{name!r} is not in trainer/run_logger.py's PEAK_FLOPS table"
    other = [w for w in words if w in _OTHER_PART_WORDS]
    if other:
        return None, f"{name!r} is a variant ({' '.join(other)}) the PEAK_FLOPS table does not list"
    model = models[0]
    variants = {_VARIANT_WORDS[w] for w in words if w in _VARIANT_WORDS}
    known = {v for m, v in PEAK_FLOPS if m == model}
    if known == {""}:
        return model, ""
    if not variants and model in ("h100", "h200"):
        variants = {"sxm"}
    if len(variants) == 1 and variants <= known:
        return model, variants.pop()
    return None, f"{name!r}: cannot tell which {model.upper()} variant ({', '.join(sorted(known))}) it is"


def peak_flops(name=None):
    """(dense 16-bit peak FLOP/s, its source) of this process's GPU, or (None, why there is no MFU)."""
    if name is None:
        if not torch.cuda.is_available():
            return None, "no MFU on the CPU (no peak FLOP/s to compare against)"
        name = torch.cuda.get_device_name()
    model, variant = gpu_model(name)
    if model is None:
        return None, f"no MFU: GPU {variant}; add its dense bf16/fp16 FLOP/s with a source"
    return PEAK_FLOPS[(model, variant)]


def flops_per_token(n_params, n_layer, n_head, n_embd, block_size, mode="full", n_trainable=None):
    """Training FLOPs per token (MFU's numerator: recomputation for checkpointing is not counted).

    Attention (PaLM appendix B): 12 * n_layer * n_embd * block_size, forward and both input gradients.
    full: 6N (forward 2N, input gradients 2N, weight gradients 2N).
    lora/qlora: the frozen base does the forward and the input-gradient matmuls but no weight gradients,
    4 * N_base, plus 6 * N_adapters for the adapters.
    """
    del n_head  # attention FLOPs depend on n_embd = n_head * head_dim only
    attention = 12 * n_layer * n_embd * block_size
    if mode == "full":
        return 6 * n_params + attention
    adapters = n_trainable or 0
    return 4 * (n_params - adapters) + 6 * adapters + attention


def peak_memory_bytes():
    """GPU: the allocator's peak allocated and reserved bytes since the last reset_peak_memory(); CPU: the
    process's peak resident memory (since it started; the OS keeps no resettable peak) and None."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None


def reset_peak_memory():
    """Start a new interval for peak_memory_bytes (GPU only)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024


def require_wandb():
    """The wandb module, or a one-line error when wandb_log=True and the package is missing."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True but the wandb package is not installed; pip install wandb, "
                        "or leave --wandb_log=False (TensorBoard logs either way)") from None
    return wandb


class RunLogger:
    def __init__(self, out_dir, enabled, tensorboard, total_iters, start_iter, wandb_run=None):
        """wandb_run: None, or {'project', 'name', 'config'} to also log to Weights & Biases."""
        self.enabled = enabled
        self._said = set()
        self.writer = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(out_dir))
        if wandb_run is not None:
            wandb = require_wandb()
            self.wandb = wandb.init(project=wandb_run["project"], name=wandb_run["name"] or Path(out_dir).name,
                                    config=wandb_run["config"], dir=str(out_dir))
            self._wandb_module = wandb
        # The bar is for terminals; in a log file the periodic lines (with their ETA) say the same.
        self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0, smoothing=0.1, disable=not sys.stderr.isatty())

    def print(self, line):
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def print_once(self, key, line):
        """A line shown once per run (why a metric is missing, say)."""
        if key not in self._said:
            self._said.add(key)
            self.print(line)

    def scalar(self, tag, value, step):
        if value is None:
            return
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)

    def _tensorboard_text(self, tag, text, step):
        # TensorBoard renders text as markdown: a code block keeps samples and JSON as they are
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def text(self, tag, text, step):
        if self.writer is not None:
            self._tensorboard_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: self._wandb_module.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def json_text(self, tag, obj, step=0):
        """Config-like JSON: a TensorBoard text, and in W&B a key of the run's config (its latest value)."""
        if self.writer is not None:
            self._tensorboard_text(tag, json.dumps(obj, indent=2, default=str), step)
        if self.wandb is not None:
            self.wandb.config.update({tag: json.loads(json.dumps(obj, default=str))}, allow_val_change=True)

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
