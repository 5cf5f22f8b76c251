"""The command-line contract every entry point shares: one flag parser, one way to fail.

Every command (`launch/*.py`, `data/**/prepare.py`) parses its flags with FlagParser: argparse's own
mistakes (an unknown flag, a value of the wrong type, a missing flag) and values outside their range
(each flag's Rule) become a UserError, and `run_main` prints any UserError as one line
`error: <what>; <the fix>` on stderr and exits with USER_ERROR_EXIT, before anything is written.
What the operating system refuses (trainer/os_errors.py) is one such line too, and SIGINT/SIGTERM one
`interrupted: ...` line with exit code 128 + the signal (trainer/signals.py).
launch/train.py's recipe keys are flags of the same parser (trainer/config.py adds them).
"""
import argparse
import gc
import sys
from dataclasses import dataclass
from typing import Callable

from trainer.errors import UserError
from trainer.launcher import launcher_rank
from trainer.os_errors import refusal_in, refusal_line
from trainer.signals import Interrupted, raise_on_signals

USER_ERROR_EXIT = 2  # every entry point, for every user mistake (argparse uses 2 as well)


@dataclass(frozen=True)
class Rule:
    """The valid values of a number, and how an error and --help say them."""
    valid: Callable[[object], bool]
    must: str  # "1 or more"

    def __iter__(self):  # (valid, must), as the config table unpacks it
        return iter((self.valid, self.must))


def at_least(low):
    return Rule(lambda v: v >= low, f"{low} or more")


def more_than(low, unit=""):
    return Rule(lambda v: v > low, f"more than {low}{unit}")


def between(low, high):
    """The half-open range [low, high)."""
    return Rule(lambda v: low <= v < high, f"in [{low}, {high})")


def number(text):
    """A flag's number as typed: an int if it is one (so an error repeats '-4', not '-4.0'), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors, range rules per flag and, optionally, a help text of our own."""

    def __init__(self, description, help_text=None):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False, add_help=help_text is None)
        self.rules = {}
        if help_text is not None:
            self.add_argument("-h", "--help", action=_PrintHelp, nargs=0, help_text=help_text)

    def add_flag(self, *names, rule=None, **kwargs):
        """add_argument, plus a Rule checked after parsing (a flag left at its default of None is not)."""
        action = self.add_argument(*names, **kwargs)
        if rule is not None:
            self.rules[action.dest] = (names[0], rule)
        return action

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")

    def check_ranges(self, args):
        for dest, (flag, rule) in self.rules.items():
            value = getattr(args, dest, None)
            if value is not None and not rule.valid(value):
                raise UserError(f"{flag}={value!r} must be {rule.must}")
        return args

    def parse(self, argv):
        """parse_args, then every flag's Rule."""
        return self.check_ranges(self.parse_args(argv))


class _PrintHelp(argparse.Action):
    def __init__(self, option_strings, dest, help_text, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.help_text = help_text

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.help_text() if callable(self.help_text) else self.help_text)
        parser.exit()


def run_main(main):
    """Run main(argv) -> exit code. A UserError, or an OS refusal (permission, read-only filesystem, no space,
    too many open files), is one line on stderr and USER_ERROR_EXIT; SIGINT/SIGTERM one line and 128 + the
    signal."""
    raise_on_signals()  # from the start: a signal during the imports is one line too
    try:
        code = main(sys.argv[1:])
    except UserError as exc:
        # Every rank meets the same bad input (the setup's checks make every rank raise a mistake any rank
        # sees); one line is enough: global rank 0's, or the only process's.
        if launcher_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        code = USER_ERROR_EXIT
    except (Interrupted, KeyboardInterrupt) as exc:
        if launcher_rank() == 0:
            print(f"interrupted: {exc if isinstance(exc, Interrupted) else 'SIGINT'}", file=sys.stderr)
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
    except Exception as exc:  # an OSError, or a library's exception around one
        refused = refusal_in(exc)
        if refused is None:
            raise
        # an OS refusal can be one node's own (its disk): every rank that meets it says so
        where = f"rank {launcher_rank()}: " if launcher_rank() else ""
        print(f"error: {where}{refusal_line(refused)}", file=sys.stderr)
        code = USER_ERROR_EXIT
    exit_quickly(code)


def exit_quickly(code):
    """sys.exit(code), sparing the interpreter's exit the garbage collector's walks over every object of
    torch, transformers and DeepSpeed: after one last collection the survivors are frozen, which takes
    1-2 s off every command on 2 cores (measured: the same time as os._exit). Unlike os._exit, atexit
    handlers, the joins of non-daemon threads and the flushing of open files all still happen."""
    gc.collect()
    gc.freeze()
    sys.exit(code or 0)
