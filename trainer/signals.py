"""SIGINT (Ctrl-C) and SIGTERM for every command: one line, exit code 128 + the signal, nothing half-written.

`cli.run_main` installs `raise_on_signals` before a command's main starts: a signal raises Interrupted where
the command is, every writer cleans up on the way out (temporary files and folders are removed, locks
released: trainer/files.py, trainer/lock.py, the dataset writer, the export), and run_main prints
`interrupted: ...`. A few steps must not be cut in half (renaming a dataset's files into place): they run
`held()`, which keeps the signal until they are done. A training run replaces this handler once its setup
starts (trainer/run/interrupts.py): the setup stops at its next stage and the loop after the current
iteration, with a checkpoint.
"""
import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal stopped the command (not an Exception: `except Exception` clean-ups must not swallow it)."""

    def __init__(self, signum, message=None):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(message or f"{name}; stopped, nothing left half-written")

    @property
    def exit_code(self):
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def raise_interrupted(signum, frame):
    del frame
    raise Interrupted(signum)


def raise_on_signals():
    """SIGINT and SIGTERM raise Interrupted (SIGTERM would otherwise end the process without any clean-up)."""
    for sig in SIGNALS:
        signal.signal(sig, raise_interrupted)


@contextmanager
def held():
    """Run a step that must not be cut in half: a signal meanwhile is raised once the step is done."""
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            raise Interrupted(caught[0])
