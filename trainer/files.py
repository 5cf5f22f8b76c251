"""Writing files so that a reader never sees half of one: temporary names, then an atomic rename.

Every file the trainer writes in place of another (checkpoint markers, meta.pkl, run files, prepared
datasets) goes through here: readers see the old file or the whole new one, and a killed writer leaves
only a temporary file that the next writer in that folder removes.
"""
import os
import uuid
from pathlib import Path

from trainer.os_errors import with_path


def tmp_name(path):
    """A hidden temporary name beside `path`; the pid lets a later writer tell a killed writer's leftovers
    from a running one's (remove_stale_tmp)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def atomic_write(path, content):
    """Write `content` (str, bytes, or a function that writes to a binary file) to `path` atomically:
    a temporary file in the same folder, flushed to disk, then renamed over `path`.

    Not tempfile.mkstemp: its files are private (0600) whatever the umask."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, path)  # a failed write() names no file: name the one being written


def remove_stale_tmp(folder):
    """Temporary files in `folder` whose writer (its pid) no longer runs: removed."""
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")
        if len(parts) >= 4 and parts[-3].isdigit():
            try:
                os.kill(int(parts[-3]), 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except OSError:  # another user's process: still running
                pass
