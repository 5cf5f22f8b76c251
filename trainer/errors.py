"""The one exception type for user mistakes: entry points print it as one line and exit 2."""


class UserError(Exception):
    """Bad input, named with its fix; never a bug in the trainer."""
