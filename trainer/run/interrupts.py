"""SIGINT/SIGTERM during a training run: from the start of its setup to its last save, nothing half-written.

StopRequest replaces the handler every command starts with (trainer/signals.py, which raises at once) when
train() begins. Its handler only sets a flag:
- during the setup, stop_point() is called between stages (after the inputs are checked, the plan made, the
  model loaded, the engine built, a checkpoint loaded, the run's files written); the first one after a
  signal raises Interrupted on every rank together: one line `interrupted: SIGINT while <stage>; ...`, exit
  code 128 + the signal. The out_dir is then as it was (a resume's checkpoints untouched) or holds a run
  without a checkpoint, which the same command starts again;
- in the loop, which checks it between iterations, where a checkpoint is consistent: finish the current
  iteration, save, exit 0 with how to resume. Ranks agree on it through the loop's one small all-reduce per
  iteration, so they all stop at the same iteration. A second signal while saving is refused, so it cannot
  corrupt the save.
"""
import signal
import sys

from trainer.run import fault_injection
from trainer.run.ranks import agree_any, collective_device
from trainer.signals import Interrupted


class StopRequest:
    active = None  # the installed one (signal handlers belong to the process)

    def __init__(self):
        self.requested = False
        self.signum = None
        self.saving = False
        self.in_loop = False  # the setup is over: a signal now means "save and stop"
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        StopRequest.active = self
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.saving or (self.requested and self.in_loop):
            print(f"{name} again: still saving the checkpoint, please wait", file=sys.stderr, flush=True)
            return
        if self.requested:
            print(f"{name} again: stopping at the end of this step of the setup, please wait", file=sys.stderr,
                  flush=True)
            return
        self.requested, self.signum = True, signum
        if self.in_loop:
            print(f"{name}: stopping after this iteration and saving a checkpoint", file=sys.stderr, flush=True)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if StopRequest.active is self:
            StopRequest.active = None


def stop_point(stage):
    """The setup has finished `stage` ('building the engine'): stop here if a signal came (every rank at once)."""
    stop = StopRequest.active
    if stop is None:
        return
    fault_injection.pause_at(stage, lambda: stop.requested)
    signum = stop.signum or signal.SIGINT
    if agree_any([stop.requested], collective_device())[0]:  # a rank the signal missed stops too
        raise Interrupted(signum, f"{signal.Signals(signum).name} while {stage}; nothing was trained and no checkpoint "
                                  f"saved: run the same command again")
