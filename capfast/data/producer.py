"""The producer thread behind CaptionLoader.epoch(): batches prepared ahead of the training thread (issue #8).

Training must never wait for data, so reading, decoding, cropping and normalizing batch n+k run on a thread of
their own while the consumer works on batch n; the consumer only takes finished items from a bounded queue.
Python on either thread holds the GIL, so the producer's per-batch Python must stay small (one call per batch
where one call does it).

The thread ends at the end of its source, on close() (also reached by `with`, by closing a generator that
`yield from`s the epoch, by garbage collection, and by an exception such as KeyboardInterrupt arriving while the
consumer waits in next()), or after handing its source's exception to the consumer, which raises that same
exception object, its traceback still showing the producer's frames. close() returns once the thread has ended,
and the thread's last act is closing its source, so nothing the source started (ffcv's reader thread) outlives it.
"""

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

POLL_S = 0.05  # how often a blocked put/get looks at the stop flag and the other thread
JOIN_TIMEOUT_S = 60  # a batch in progress (a decode, a numba loop) is finished, never abandoned


class Producer:
    """Iterates the items of `make_source()`, computed on a daemon thread up to `depth` items ahead."""

    def __init__(self, make_source: Callable[[], Iterator], depth: int, thread_context=contextlib.nullcontext,
                 name: str = "capfast-producer"):
        if depth < 1:
            raise ValueError(f"a producer needs depth >= 1, got {depth}")
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._closed = False
        # The thread gets no reference to self: an abandoned Producer can then be garbage-collected (and closed).
        self._thread = threading.Thread(target=_produce, name=name, daemon=True,
                                        args=(make_source, thread_context, self._queue, self._stop))
        self._thread.start()

    @property
    def ready(self) -> int:
        """Items prepared and waiting for the consumer."""
        return self._queue.qsize()

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        try:
            item = self._get()
        except BaseException:  # e.g. KeyboardInterrupt while waiting: stop the producer before it propagates
            self.close()
            raise
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        if item is _END:
            self.close()
            raise StopIteration
        return item

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the loader's producer thread ended without a result") from None

    def close(self) -> None:
        """Stops the thread and waits for it (at most the batch it is working on, then its source's close)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is threading.current_thread():
            return
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._discard_ready()  # frees the prepared batches now, and unblocks a put at once
            self._thread.join(POLL_S)
        self._discard_ready()

    def _discard_ready(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _produce(make_source, thread_context, out: queue.Queue, stop: threading.Event) -> None:
    try:
        with thread_context():
            source = make_source()
            try:
                for item in source:
                    if not _put(out, item, stop):
                        return
                _put(out, _END, stop)
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
    except BaseException as error:  # handed to the consumer, which raises it
        _put(out, _Failure(error), stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts `item` unless stopped first; True when the producer should go on with the next item."""
    while not stop.is_set():
        try:
            out.put(item, timeout=POLL_S)
            return not stop.is_set()
        except queue.Full:
            pass
    return False


class EpochBatches:
    """The batches of one epoch, as CaptionLoader.epoch returns them: an iterator with close() (also called by
    `with`; garbage collection closes the Producer or generator inside) and `ready_batches`, the number of
    batches prepared and waiting.

    `items` yields (batch, ready) pairs, from a Producer or computed in the consumer's thread; `hand_over(batch,
    ready)` runs in the consumer's thread for each and returns what the consumer gets.
    """

    def __init__(self, items: Iterator, hand_over: Callable):
        self._items = items
        self._hand_over = hand_over

    @property
    def ready_batches(self) -> int:
        return int(getattr(self._items, "ready", 0))

    def __iter__(self):
        return self

    def __next__(self):
        return self._hand_over(*next(self._items))

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _End:
    def __repr__(self):
        return "<end of source>"


_END = _End()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
