"""What every entry point shares: a user mistake is one `error:` line and exit code 2.

Flags of sample.py, eval.py and merge_adapter.py go through FlagParser: argparse's own mistakes
(an unknown flag, a value of the wrong type) and values out of range (check_ranges) become the
same one-line error instead of argparse's usage block.
"""
import argparse
import os
import sys

from trainer.errors import UserError

USER_ERROR_EXIT = 2  # every entry point, for every user mistake (argparse uses 2 as well)


class FlagParser(argparse.ArgumentParser):
    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


def at_least(low):
    return (lambda v: v >= low), f"{low} or more"


def more_than(low):
    return (lambda v: v > low), f"more than {low}"


def check_ranges(args, rules):
    """rules: {flag name: (valid, must)}; None values (flag not given) are not checked."""
    for name, (valid, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not valid(value):
            raise UserError(f"--{name}={value!r} must be {must}")
    return args


def run_main(main):
    try:
        code = main(sys.argv[1:])
    except UserError as exc:
        # Every rank meets the same bad input; one line is enough (rank 0's, or the only process's).
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        code = USER_ERROR_EXIT
    sys.exit(code)
