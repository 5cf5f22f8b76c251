"""Where a run's start-up goes: the seconds from the command to the first iteration, phase by phase.

One clock per process (CLOCK), started when this module is first imported (launch/train.py's first import of
the trainer) and marked after each phase: what happened since the previous mark is that phase. Before it,
two phases the clock reads from the operating system (Linux's /proc; elsewhere they are left out):
- launcher: from the start of the `deepspeed` (or torchrun) command to the start of this rank's process,
  the launcher's own cost (it imports torch and DeepSpeed itself, twice under `deepspeed`: its runner and
  its per-node launcher);
- python: from this process's start to the clock's start (the interpreter, site and .pth files).
The loop prints the table with --log_level=debug and logs it to TensorBoard as the text `startup` either way
(docs/training.md#start-up). Nothing here imports torch: the clock runs before torch is imported.
"""
import os
import time
from pathlib import Path

LAUNCHERS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch")


def _stat_fields(pid):
    """/proc/PID/stat's fields after the command name (which may hold spaces), or None off Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid="self"):
    """The wall-clock time (time.time()) a process started, to the kernel's clock tick; None off Linux.

    From its age (the system's uptime less its start in ticks since boot), not from the boot time, which
    /proc gives in whole seconds only."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        now = time.time()
        return now - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_start():
    """When the launcher command that started this process began: the oldest ancestor in the unbroken chain
    of parents whose command line names a launcher (`deepspeed` runs a runner, then a per-node launch.py);
    None without one (a plain `python launch/train.py`)."""
    started, pid = None, os.getppid()
    while pid > 1 and any(name in _cmdline(pid) for name in LAUNCHERS):
        started = process_start(pid) or started
        fields = _stat_fields(pid)
        pid = int(fields[1]) if fields else 0  # its parent
    return started


class StartupClock:
    def __init__(self):
        self.started = time.time()
        self.last = self.started
        self.phases = []  # (phase, seconds) in order
        self.done = False

    def mark(self, phase):
        """`phase` just ended: its seconds are the time since the previous mark."""
        if self.done:  # after the first iteration (a step-down rebuilds the engine: not start-up)
            return
        now = time.time()
        self.phases.append((phase, now - self.last))
        self.last = now

    def finish(self):
        """The first iteration begins: {phase: seconds}, the launcher and python phases first, and the total."""
        self.done = True
        before = []
        own = process_start()
        if own is not None:
            launcher = launcher_start()
            if launcher is not None:
                before.append(("launcher (its own processes)", max(0.0, own - launcher)))
            before.append(("python start-up", max(0.0, self.started - own)))
        phases = dict(before + self.phases)
        phases["total"] = sum(phases.values())
        return phases


def format_phases(phases):
    """The console table of finish()'s phases."""
    lines = [f"start-up: {phases['total']:.1f} s from the command to the first iteration"]
    lines += [f"  {phase:<44} {seconds:6.2f} s" for phase, seconds in phases.items() if phase != "total"]
    return "\n".join(lines)


CLOCK = StartupClock()
