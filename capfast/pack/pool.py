"""An ordered, bounded process pool for `capfast convert`.

`ordered_map(fn, items, workers)` yields fn(item) in input order while worker processes run ahead by at most a
few chunks, so memory stays bounded however long the input is. A worker that dies (OOM kill, segfault) becomes a
CapfastError instead of a hang; workers die with their parent, so kill -9 of convert leaves no process behind;
Ctrl-C reaches only the parent, which then stops the workers.
"""

import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import islice

import cv2

from capfast.common.signals import die_with_parent
from capfast.errors import CapfastError

CHUNKS_AHEAD_PER_WORKER = 4
MAX_CHUNK = 16


def ordered_map(fn, items, workers: int, initializer=None, initargs=(), chunk_size: int | None = None):
    """Yields fn(item) for each of the `items` (a list) in order, computed by `workers` processes (in this
    process when 1); `initializer(*initargs)` runs first in each of them. fn and initializer must be
    module-level functions (they are pickled by name)."""
    with opencv_single_threaded():
        if workers <= 1:
            if initializer is not None:
                initializer(*initargs)
            yield from map(fn, items)
        else:
            yield from pooled_map(fn, items, workers, initializer, initargs, chunk_size)


def pooled_map(fn, items, workers: int, initializer, initargs, chunk_size: int | None):
    chunk_size = chunk_size or max(1, min(MAX_CHUNK, len(items) // (workers * CHUNKS_AHEAD_PER_WORKER)))
    pool = ProcessPoolExecutor(workers, mp_context=start_context(), initializer=_init_worker,
                               initargs=(os.getpid(), initializer, initargs))
    pending = deque()
    try:
        for chunk in chunked(items, chunk_size):
            pending.append(pool.submit(_run_chunk, fn, chunk))
            if len(pending) >= workers * CHUNKS_AHEAD_PER_WORKER:
                yield from result(pending.popleft())
        while pending:
            yield from result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def opencv_single_threaded():
    """No OpenCV thread pool while workers are forked (nor in a 1-worker run): a forked child inherits the
    pool's bookkeeping without its threads and hangs at its next OpenCV call (seen with OpenCV 5)."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # stops the pool's threads
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def start_context():
    """fork where there is one: workers start at once and inherit what the parent imported."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def chunked(items, size: int):
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def result(future) -> list:
    try:
        return future.result()
    except BrokenProcessPool:
        raise CapfastError("a worker process died (killed, out of memory, or crashed in an image library); "
                           "nothing was written") from None


def _run_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _init_worker(parent: int, initializer, initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool
    die_with(parent)
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would oversubscribe the cores
    if initializer is not None:
        initializer(*initargs)


def die_with(parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)
