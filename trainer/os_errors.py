"""What the operating system refuses, as one line: the path, its reason (strerror) and the fix.

Permission denied, a read-only filesystem, no space (or quota, or a file-size limit), too many open files:
none of these is a bug, and each has one fix the user can apply. `cli.run_main` turns any such OSError that
reaches it into `error: <path>: <reason>; <fix>` and exit code 2; code that must say more (a checkpoint save
keeps the previous checkpoint) builds its own line with `reason` and `fix`. Libraries that wrap the
OSError in their own exception (datasets, transformers) are unwrapped with `refusal_in`.
"""
import errno
import os
import re

from trainer.errors import UserError

RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) say errno

FIXES = {
    errno.EACCES: "give this user access to it (ls -l shows who may read and write it) or choose another path",
    errno.EPERM: "give this user access to it (ls -l shows who may read and write it) or choose another path",
    errno.EROFS: "that filesystem is mounted read-only: choose a path on a writable one",
    errno.ENOSPC: "free disk space there or choose a path on a disk with room (df -h shows what is free)",
    errno.EDQUOT: "your disk quota is used up: free space or choose a path outside the quota",
    errno.EFBIG: "the file-size limit was reached (ulimit -f, or the filesystem's largest file): raise it or "
                 "choose a path on another disk",
    errno.EMFILE: "this process may open no more files: raise the limit (ulimit -n 65536) and run it again",
    errno.ENFILE: "the system's table of open files is full: close other programs or raise fs.file-max",
}


def is_refusal(exc):
    return isinstance(exc, OSError) and exc.errno in FIXES


def reason(exc):
    """'path: strerror' (or the strerror alone when no path is known)."""
    text = exc.strerror or str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


def fix(exc):
    return FIXES.get(exc.errno, "check the path and its filesystem")


def refusal_line(exc):
    """The UserError of an OS refusal: `path: reason; fix`."""
    return UserError(f"{reason(exc)}; {fix(exc)}")


def refusal_in(exc):
    """The OS refusal somewhere in an exception's chain of causes (a library's wrapped OSError, or a Rust
    library's error message holding `(os error 28)`), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if is_refusal(exc):
            return exc
        found = None if isinstance(exc, OSError) else RUST_IO_ERROR.search(str(exc))
        if found and int(found.group(1)) in FIXES:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def with_path(exc, path):
    """The same OSError naming `path` when it named none (a failed write() on an open file names nothing)."""
    if isinstance(exc, OSError) and not exc.filename:
        exc.filename = str(path)
    return exc
