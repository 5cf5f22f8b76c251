"""What every entry point shares: a user mistake is one `error:` line and exit code 2."""
import sys

from trainer.errors import UserError


def run_main(main):
    try:
        code = main(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
