"""What every entry point shares: a user mistake is one `error:` line and exit code 2."""
import os
import sys

from trainer.errors import UserError


def run_main(main):
    try:
        code = main(sys.argv[1:])
    except UserError as exc:
        # Every rank meets the same bad input; one line is enough (rank 0's, or the only process's).
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
