"""What a run shows: console lines, a progress bar with ETA, TensorBoard and optionally W&B (rank 0 only).

TensorBoard is the default. With wandb_log=True the same scalars go to Weights & Biases under the same
tags, samples as HTML, and the config, plan and DeepSpeed config as the W&B run's config; every launch
(a resume too) is a new W&B run named after the out_dir (or wandb_run_name).
"""
import html
import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.errors import UserError

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
        """wandb_run: None, or {'project', 'name', 'config'} to also log to Weights & Biases.

        TensorBoard's event file and the W&B run are opened at the first value logged, not here: a setup that
        fails after this (a checkpoint that does not load) leaves nothing in out_dir."""
        self.enabled = enabled
        self._said = set()
        self.writer = None
        self.wandb = None
        self.bar = None
        self._to_open = (out_dir, tensorboard, wandb_run) if enabled else None
        if not enabled:
            return
        if wandb_run is not None:
            require_wandb()
        # The bar is for terminals; in a log file the periodic lines (with their ETA) say the same.
        self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0, smoothing=0.1, disable=not sys.stderr.isatty())

    def _open(self):
        """TensorBoard's writer and the W&B run, at the first value logged."""
        if self._to_open is None:
            return
        out_dir, tensorboard, wandb_run = self._to_open
        self._to_open = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(out_dir))
        if wandb_run is not None:
            wandb = require_wandb()
            self.wandb = wandb.init(project=wandb_run["project"], name=wandb_run["name"] or Path(out_dir).name,
                                    config=wandb_run["config"], dir=str(out_dir))
            self._wandb_module = wandb

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
        self._open()
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)

    def _tensorboard_text(self, tag, text, step):
        # TensorBoard renders text as markdown: a code block keeps samples and JSON as they are
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def text(self, tag, text, step):
        self._open()
        if self.writer is not None:
            self._tensorboard_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: self._wandb_module.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def json_text(self, tag, obj, step=0):
        """Config-like JSON: a TensorBoard text, and in W&B a key of the run's config (its latest value)."""
        self._open()
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
