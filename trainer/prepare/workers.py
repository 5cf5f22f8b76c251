"""Work in parallel, results in order: a pool of worker processes over a stream of tasks.

Corpus encoding (trainer/prepare/encode.py) and instruction rendering (trainer/prepare/instructions.py)
both run through run_tasks: at most 2 x num_proc tasks in flight, so memory stays bounded whatever the
corpus size, and results come back in the order of the tasks.
"""
import collections
import itertools
import multiprocessing
import os
import signal
import sys
import threading

END_TIMEOUT_S = 60  # for the tasks in flight when the caller stops early: a few chunks take seconds

# Imported, these run native thread pools that a forked child would inherit half-held (locks, queues).
_THREADED_MODULES = ("pyarrow", "torch")


def start_method() -> str:
    """'fork' when it is safe, else 'spawn'.

    fork starts a worker in milliseconds with the tokenizer already loaded; spawn re-imports and
    reloads the BPE in each (about 0.5 s of CPU each, 15% of a 50 MB run's time). Forking is safe
    only from a process with one thread: not after `datasets`/pyarrow or torch were imported (row
    inputs, or prepare called from a process that trains), nor on platforms without fork.
    """
    if ("fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
            and not any(name in sys.modules for name in _THREADED_MODULES)):
        return "fork"
    return "spawn"


def run_tasks(tasks, num_proc: int, init, initargs, func):
    """Yield (meta, result) of each (meta, pieces) task in order, at most 2 x num_proc in flight.

    Workers start only when there is more than one task: a small input is encoded in-process.
    """
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, 2))
    if num_proc <= 1 or len(head) < 2:
        init(*initargs)
        for meta, pieces in itertools.chain(head, tasks):
            yield meta, func(pieces)
        return
    pool = multiprocessing.get_context(start_method()).Pool(num_proc, start_worker, (init, initargs))
    in_flight = collections.deque()
    try:
        for meta, pieces in itertools.chain(head, tasks):
            in_flight.append((meta, pool.apply_async(func, (pieces,))))
            if len(in_flight) >= 2 * num_proc:
                meta, result = in_flight.popleft()
                yield meta, result.get()
        while in_flight:
            meta, result = in_flight.popleft()
            yield meta, result.get()
    finally:
        end_pool(pool, [result for _, result in in_flight])


def end_pool(pool, in_flight):
    """End the workers, also when the caller stopped early (an error, a full disk, a signal).

    Pool.terminate() kills workers wherever they are, and one killed while it writes its result holds the
    result queue's lock forever: the pool's task handler then waits on that lock, and terminate() with it
    (seen on a full disk under load). So the tasks in flight (at most 2 x num_proc chunks) finish first and the
    workers leave normally; only a pool whose workers do not finish within END_TIMEOUT_S is terminated."""
    for result in in_flight:
        result.wait(END_TIMEOUT_S)
    if all(result.ready() for result in in_flight):
        pool.close()
    else:
        pool.terminate()
    pool.join()


def start_worker(init, initargs):
    """A worker leaves signals to the main process (trainer/signals.py): Ctrl-C reaches the whole process group
    and is the main process's to handle; the pool ends its workers with SIGTERM, which just ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init(*initargs)


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
