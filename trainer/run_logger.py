"""What a run shows: console lines, a progress bar with ETA, and TensorBoard (rank 0 only)."""
import json
import resource
import sys

import torch
from tqdm import tqdm

# Peak dense bf16/fp16 FLOP/s of common GPUs, for MFU (nanoGPT reports MFU against A100's 312 TFLOPS).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10": 125e12, "L40": 181e12,
              "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 312e12)


def flops_per_token(n_params, n_layer, n_head, n_embd, block_size):
    """PaLM appendix B: 6N for the matmuls plus attention, per token of training."""
    return 6 * n_params + 12 * n_layer * n_head * (n_embd // n_head) * block_size


def peak_memory_bytes():
    """GPU: the allocator's peak; CPU: the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024


class RunLogger:
    def __init__(self, out_dir, enabled, tensorboard, total_iters, start_iter):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(out_dir))
        # The bar is for terminals; in a log file the periodic lines (with their ETA) say the same.
        self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0, smoothing=0.1, disable=not sys.stderr.isatty())

    def print(self, line):
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def scalar(self, tag, value, step):
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step)

    def text(self, tag, text, step):
        if self.writer is not None:
            # TensorBoard renders text as markdown: a code block keeps samples and JSON as they are
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def json_text(self, tag, obj, step=0):
        self.text(tag, json.dumps(obj, indent=2, default=str), step)

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
