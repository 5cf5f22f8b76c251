"""What one optimizer step allocates on the CPU beside its states, in bytes per element of the tensor stepped.

    python bench/optimizer_temps.py [--elements=40000000] [--optimizer=adamw8bit|paged_adamw|bnb_adamw|torch]

bitsandbytes' CPU kernels are registered torch ops whose Python body makes its temporaries below the
dispatcher, where torch's MemTracker cannot see them; the peak resident memory of a process that steps one
large tensor once can. The memory model's BNB_CPU_TEMPS_BYTES (trainer/plan/memory.py) is this number.
Prints one line: `<optimizer> temporaries bytes/element: X`.
"""
import argparse
import gc
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer, even if another is installed


def peak_rss():
    """The process's resident high-water mark (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=40_000_000)
    ap.add_argument("--optimizer", default="adamw8bit", choices=("adamw8bit", "bnb_adamw", "torch"))
    args = ap.parse_args()
    import psutil
    import torch
    n = args.elements
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    if args.optimizer == "torch":
        opt = torch.optim.AdamW([p], lr=1e-3, foreach=False)
    else:
        import bitsandbytes as bnb
        opt = (bnb.optim.AdamW8bit if args.optimizer == "adamw8bit" else bnb.optim.AdamW)([p], lr=1e-3)
    gc.collect()
    # every page resident now (a memory reclaimer may have moved cold ones out), then the high-water mark reset
    # to this moment (Linux: clear_refs 5), so that the peak is this step's alone
    p.data.add_(0.0)
    p.grad.add_(0.0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # no reset: the check below says when the earlier peak would hide the step's
    live = psutil.Process().memory_info().rss
    if peak_rss() > 1.05 * live:
        sys.exit("the process's peak is already above its live set: nothing to measure (raise --elements)")
    opt.step()  # the first step creates the states, then updates like every later step
    states = sum(v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    peak = peak_rss()
    print(f"{args.optimizer} temporaries bytes/element: {(peak - live - states) / n:.2f}")


if __name__ == "__main__":
    main()
