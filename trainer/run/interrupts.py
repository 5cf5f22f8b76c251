"""SIGINT/SIGTERM: finish the current iteration, save, exit 0 with how to resume.

The handler only sets a flag; the loop checks it between iterations, where a checkpoint is
consistent. Ranks agree on it through the loop's one small all-reduce per iteration, so they all stop at the same
iteration. A second signal while saving is refused, so it cannot corrupt the save.
"""
import signal
import sys


class StopRequest:
    def __init__(self):
        self.requested = False
        self.saving = False
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.saving or self.requested:
            print(f"{signal.Signals(signum).name} again: still saving the checkpoint, please wait",
                  file=sys.stderr, flush=True)
            return
        self.requested = True
        print(f"{signal.Signals(signum).name}: stopping after this iteration and saving a checkpoint",
              file=sys.stderr, flush=True)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
