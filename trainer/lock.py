"""One writer per folder: a lock that a second writer meets as one line, and that a dead writer leaves stale.

Every process that writes a folder takes its lock first and holds it until it exits, on every path out: a
training run its out_dir (global rank 0, for the whole run; the other ranks write only inside the
checkpoint saves rank 0 coordinates), data/prepare.py the dataset folder it writes, an export its
export_dir. Readers (sample.py, eval.py, TensorBoard, an export reading a run) never look at it.

The lock is a file (`<folder>/.lock`, or a name beside the folder for an export) naming its holder: host,
pid, the process's start time, when it took the lock and what it is. Two mechanisms hold it:
- fcntl.flock on that file, where the filesystem supports it (local disks; NFSv4 and Lustre mounted with
  flock hold it across nodes): the kernel releases it when the holder dies, even by kill -9;
- the holder's name in the file, for filesystems without flock and for a holder on another node: a holder
  on this host whose process no longer runs (its pid is gone, or belongs to a process started at another
  time) is stale; a holder on another host is stale once its heartbeat (the file's modification time, which
  a holder refreshes every HEARTBEAT_S) is older than STALE_AFTER_S, because only a dead node stops it.
A stale lock is taken over, said in one line. Without flock two writers starting within the same moment
could both read "free": each writes its name, waits SETTLE_S and reads the file back; the later writer wins.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

from trainer.errors import UserError
from trainer.os_errors import with_path

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: a node that is down, not a busy one
SETTLE_S = 0.2
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def pid_namespace():
    """Processes in two containers on one host see different pids: a pid is checked only in its own namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def me(command):
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "since": time.time(), "command": command, "pid_namespace": pid_namespace()}


def describe(holder):
    since = datetime.fromtimestamp(holder["since"]).strftime("%Y-%m-%d %H:%M:%S")
    return f"{holder['command']} (pid {holder['pid']} on {holder['host']}, since {since})"


def on_this_host(holder):
    return holder["host"] == socket.gethostname() and holder.get("pid_namespace", "") == pid_namespace()


def stale_reason(holder, heartbeat):
    """None while the holder may be alive, else why it is not."""
    if on_this_host(holder):
        try:
            alive = abs(psutil.Process(holder["pid"]).create_time() - holder["started"]) < 1.0
        except psutil.NoSuchProcess:
            alive = False
        except psutil.AccessDenied:  # another user's process: it runs
            alive = True
        return None if alive else "which no longer runs"
    age = time.time() - heartbeat
    if age > STALE_AFTER_S:
        return f"whose heartbeat stopped {age:.0f} s ago (a holder refreshes it every {HEARTBEAT_S:.0f} s)"
    return None


class FolderLock:
    """lock = FolderLock(folder, 'training run', 'choose another --out_dir').acquire() ... lock.release(),
    or `with FolderLock(...):`. `fix` ends the line a second writer sees."""

    def __init__(self, folder, command, fix, lock_file=None, heartbeat_thread=True):
        self.folder = Path(folder)
        self.path = Path(lock_file) if lock_file else self.folder / LOCK_FILE
        self.command, self.fix, self.heartbeat_thread = command, fix, heartbeat_thread
        self.fd, self.info, self.created, self.last_beat = None, None, [], 0.0
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        parent = self.path.parent
        self.created = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd, flocked = self.open_and_flock()
            try:
                self.take(fd, flocked)
            except BaseException:
                os.close(fd)
                raise
        except BaseException as exc:
            self.remove_created()
            raise with_path(exc, self.path)
        self.fd = fd
        self.last_beat = time.monotonic()
        if self.heartbeat_thread:
            self.thread = threading.Thread(target=self.beat_forever, name="lock-heartbeat", daemon=True)
            self.thread.start()
        return self

    def open_and_flock(self):
        """(fd, flocked) of the lock file; a live holder of the flock is refused here."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                holder = read_holder(fd)
                for _ in range(20):  # a holder that has just taken the flock writes its name within moments
                    if holder is not None:
                        break
                    time.sleep(0.05)
                    holder = read_holder(fd)
                os.close(fd)
                self.refuse(holder, None)
            except OSError as exc:
                if exc.errno not in NO_FLOCK:
                    os.close(fd)
                    raise
                flocked = False  # this filesystem has no flock: the holder's name decides alone
            # The holder may have released (unlinked) the file between our open and flock: use the file on disk.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, flocked
            os.close(fd)

    def take(self, fd, flocked):
        holder = read_holder(fd)
        if holder is not None:
            why = stale_reason(holder, os.fstat(fd).st_mtime)
            if why is None:
                self.refuse(holder, os.fstat(fd).st_mtime)
            print(f"notice: took over the lock on {self.folder} held by {describe(holder)}, {why}", file=sys.stderr)
        self.info = me(self.command)
        write_holder(fd, self.info)
        if not flocked:
            time.sleep(SETTLE_S)
            holder = read_holder(fd)
            if holder != self.info:
                self.refuse(holder, os.fstat(fd).st_mtime)

    def refuse(self, holder, heartbeat):
        who = describe(holder) if holder else "another process"
        line = f"{self.folder} is in use by {who}; wait for it to finish or stop it, or {self.fix}"
        if holder and not on_this_host(holder) and heartbeat is not None:
            line += (f" (its heartbeat is {time.time() - heartbeat:.0f} s old; if its node is down, the lock is taken "
                     f"over once that reaches {STALE_AFTER_S:.0f} s, or delete {self.path})")
        raise UserError(line)

    def beat(self):
        """Refresh the heartbeat if it is due (writers without the heartbeat thread call this as they go)."""
        if self.fd is not None and time.monotonic() - self.last_beat >= HEARTBEAT_S:
            self.last_beat = time.monotonic()
            try:
                os.utime(self.fd)
            except OSError:  # a full disk may refuse even this; the next beat tries again
                pass

    def beat_forever(self):
        while not self.stop.wait(HEARTBEAT_S):
            self.beat()

    def release(self):
        """Give the lock up (the file is removed while still held, so no one takes a lock on a deleted file)."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join(timeout=5)
            self.thread = None
        if self.fd is not None:
            try:
                if read_holder(self.fd) == self.info:
                    os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        self.remove_created()

    def remove_created(self):
        """The folders acquire made, if nothing else was written into them."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []


def read_holder(fd):
    """The holder named in the lock file, or None (empty: a holder that released it; unreadable: damaged)."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return holder if isinstance(holder, dict) and {"host", "pid", "started", "since"} <= set(holder) else None
    except (OSError, ValueError):
        return None


def write_holder(fd, info):
    data = json.dumps(info).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
