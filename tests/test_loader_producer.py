"""The loader's producer thread (issue #8): same batches as the synchronous path, errors that reach the consumer,
a prompt stop with no thread left behind, and real overlap with the consumer's work. Runs on the CPU; the CUDA
variants at the end are marked gpu."""

import contextlib
import os
import signal
import threading
import time

import pytest
import torch

from capfast.common.normalization import IMAGENET
from capfast.data import LoaderOptions, build_loader
from capfast.errors import CapfastError

# numba prints a harmless KeyError when ffcv's compiled pipelines are garbage-collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SIZE, BATCH = 32, 4  # 8 batches per epoch of the 32-image synthetic split


def loader(beton, prefetch: int, device="cpu", dtype=torch.float32):
    options = LoaderOptions(batch_size=BATCH, image_size=SIZE, workers=1, prefetch=prefetch)
    return build_loader(beton, options, train=True, device=device, dtype=dtype, seed=0, normalization=IMAGENET)


@pytest.fixture(scope="module")
def train_beton(converted):
    return converted / "train.beton"


@pytest.fixture(scope="module")
def producer_loader(train_beton):
    return loader(train_beton, prefetch=3)


@pytest.fixture(scope="module")
def sync_loader(train_beton):
    return loader(train_beton, prefetch=0)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and torch.equal(x.captions, y.captions)
        and torch.equal(x.ncaptions, y.ncaptions) and torch.equal(x.image_ids, y.image_ids) for x, y in zip(a, b))


def threads_since(before: set) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def is_producer(thread: threading.Thread) -> bool:
    return thread.name.startswith("capfast-producer")


@contextlib.contextmanager
def slow_batches(loader_, delay_s: float, at_batch: int | None, action=lambda: None):
    """Makes the loader's per-batch function sleep `delay_s`, then run `action`, before batch `at_batch` (every
    batch when None)."""
    real = loader_._cpu_batch

    def delayed_cpu_batch(raw, epoch, b):
        if at_batch is None or b == at_batch:
            time.sleep(delay_s)
            action()
        return real(raw, epoch, b)

    loader_._cpu_batch = delayed_cpu_batch
    try:
        yield
    finally:
        del loader_._cpu_batch


# ---- same batches -----------------------------------------------------------------------------------------

def test_the_producer_gives_exactly_the_synchronous_batches(producer_loader, sync_loader):
    threaded = list(producer_loader.epoch(1))
    assert len(threaded) == 8 and same_batches(threaded, list(sync_loader.epoch(1)))
    assert same_batches(list(producer_loader.epoch(1, skip_batches=5)), list(sync_loader.epoch(1, skip_batches=5)))
    assert same_batches(list(producer_loader.epoch(1, skip_batches=5)), threaded[5:])


def test_ready_batches_counts_the_prepared_batches(producer_loader, sync_loader):
    with producer_loader.epoch(0) as batches:
        deadline = time.monotonic() + 60
        while batches.ready_batches < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batches.ready_batches == 3  # prefetch=3: the producer stops there until the consumer takes one
        next(batches)
    with sync_loader.epoch(0) as batches:
        assert isinstance(batches.ready_batches, int) and batches.ready_batches == 0


def test_a_negative_prefetch_is_a_one_line_error(train_beton):
    with pytest.raises(CapfastError, match="data.prefetch must be an integer >= 0, got -1"):
        loader(train_beton, prefetch=-1)


# ---- errors and shutdown ----------------------------------------------------------------------------------

def test_an_error_on_the_producer_reaches_the_consumer_with_its_traceback(producer_loader):
    def broken(*_):
        raise ValueError("cannot prepare batch 2")

    before = set(threading.enumerate())
    with slow_batches(producer_loader, 0.0, at_batch=2, action=broken):
        batches = producer_loader.epoch(0)
        assert len(list(zip(range(2), batches))) == 2
        with pytest.raises(ValueError, match="cannot prepare batch 2") as error:
            next(batches)
    assert any(entry.name == "delayed_cpu_batch" for entry in error.traceback)  # the producer's frames
    assert threads_since(before) == []


def test_close_stops_the_threads_promptly(producer_loader):
    before = set(threading.enumerate())
    batches = producer_loader.epoch(0)
    next(batches)
    started = threads_since(before)
    assert any(map(is_producer, started)) and len(started) >= 2  # the producer and ffcv's reader
    began = time.monotonic()
    batches.close()
    assert time.monotonic() - began < 10 and threads_since(before) == []
    with pytest.raises(StopIteration):
        next(batches)


def test_break_and_the_end_of_an_epoch_leave_no_thread(producer_loader):
    before = set(threading.enumerate())
    for _ in producer_loader.epoch(0):
        assert any(map(is_producer, threads_since(before)))
        break
    assert threads_since(before) == []
    assert len(list(producer_loader.epoch(0))) == 8 and threads_since(before) == []


def test_keyboard_interrupt_while_waiting_for_a_batch_stops_the_producer(producer_loader):
    """A Ctrl-C (a real SIGINT to this process) that arrives while the training thread waits in next() (here:
    while batch 2 is slow)."""
    before = set(threading.enumerate())
    handlers = []

    def press_ctrl_c():
        handlers.append(signal.getsignal(signal.SIGINT))  # what the process does with it, should this fail
        os.kill(os.getpid(), signal.SIGINT)

    with slow_batches(producer_loader, 1.0, at_batch=2, action=press_ctrl_c), python_handles_sigint():
        batches = producer_loader.epoch(0)
        with pytest.raises(KeyboardInterrupt):
            for _ in batches:
                pass
            pytest.fail(f"no KeyboardInterrupt; the SIGINT handler was {handlers}")
    assert threads_since(before) == []


@contextlib.contextmanager
def python_handles_sigint():
    """Python's own Ctrl-C handler, as in a terminal: a process started in the background by a shell without job
    control (`make test &`, some CI runners) inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- overlap ----------------------------------------------------------------------------------------------

class Timeline:
    """When each side did its (GIL-free) work: (thread id, start, end) per piece of work."""

    def __init__(self):
        self.intervals: list[tuple[int, float, float]] = []

    def work(self, seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        self.intervals.append((threading.get_ident(), start, time.perf_counter()))

    def threads(self) -> set[int]:
        return {thread for thread, _, _ in self.intervals}

    def share_during(self, other: "Timeline") -> float:
        """The fraction of this side's work time during which the other side was working too."""
        overlap = sum(max(0.0, min(end, other_end) - max(start, other_start))
                      for _, start, end in self.intervals for _, other_start, other_end in other.intervals)
        return overlap / sum(end - start for _, start, end in self.intervals)


def overlap_run(loader_, work_s: float, epochs=(2, 3)) -> tuple[Timeline, Timeline]:
    """Consumes `epochs` with `work_s` of work per batch on each side: the loader's batch function and the
    consumer's loop. Returns (loader's timeline, consumer's timeline)."""
    loader_side, consumer_side = Timeline(), Timeline()
    with slow_batches(loader_, 0.0, None, action=lambda: loader_side.work(work_s)):
        for epoch in epochs:
            for _ in loader_.epoch(epoch):
                consumer_side.work(work_s)
    return loader_side, consumer_side


def test_the_consumer_s_work_overlaps_the_loader_s(producer_loader, sync_loader):
    """The property itself, not a wall-clock margin: with the producer, the loader's per-batch work (20 ms of
    GIL-free time, as an nvJPEG decode blocks the CUDA producer ~11 ms) runs on another thread while the consumer
    works; without it (prefetch=0) the two alternate on one thread and never overlap. Each epoch's first batch
    and the producer's run-ahead at its end have nothing to overlap with: about 7 of 8 batches can."""
    loader_side, consumer_side = overlap_run(producer_loader, 0.02)
    assert len(loader_side.intervals) == len(consumer_side.intervals) == 16
    assert loader_side.share_during(consumer_side) > 0.5, loader_side.share_during(consumer_side)
    assert loader_side.threads().isdisjoint(consumer_side.threads())

    loader_side, consumer_side = overlap_run(sync_loader, 0.02)
    assert loader_side.threads() == consumer_side.threads()
    assert loader_side.share_during(consumer_side) == 0.0


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------------

def cuda_loader(beton, prefetch: int):
    return loader(beton, device="cuda", dtype=torch.bfloat16, prefetch=prefetch)


@pytest.mark.gpu
def test_cuda_producer_batches_equal_the_synchronous_cuda_path(train_beton):
    threaded = [b for b in cuda_loader(train_beton, 3).epoch(1)]
    synchronous = [b for b in cuda_loader(train_beton, 0).epoch(1)]
    assert len(threaded) == len(synchronous) == 8
    one_level = 1.01 / 255 / 0.224  # the matmul resize may round a rare pixel the other way on another stream
    for a, b in zip(threaded, synchronous):
        assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.captions, b.captions)
        assert a.images.device.type == "cuda" and a.images.is_contiguous(memory_format=torch.channels_last)
        difference = (a.images.float() - b.images.float()).abs()
        assert difference.max() <= one_level + 0.02 and (difference > 0).float().mean() < 1e-3


@pytest.mark.gpu
def test_cuda_producer_stops_without_leaving_a_thread(train_beton):
    cuda = cuda_loader(train_beton, 3)
    before = set(threading.enumerate())
    batches = cuda.epoch(0)
    next(batches)
    assert any(map(is_producer, threads_since(before)))
    batches.close()
    assert threads_since(before) == []
    assert len(list(cuda.epoch(1))) == 8 and threads_since(before) == []


@pytest.mark.gpu
def test_taking_a_cuda_batch_never_syncs_the_host(train_beton):
    """The consumer's next() only makes its stream wait on the batch's event. The debug mode is process-wide,
    so this also checks that the producer's own waits are the unreported kind (events, pinned copies)."""
    cuda = cuda_loader(train_beton, 3)
    list(cuda.epoch(0))  # first use: CUDA constants, nvJPEG and cuBLAS set-up
    torch.cuda.synchronize()
    with cuda.epoch(1) as batches:
        torch.cuda.set_sync_debug_mode("error")
        try:
            taken = [next(batches) for _ in range(6)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(taken) == 6 and all(b.images.is_cuda and b.captions.is_cuda for b in taken)


@pytest.mark.gpu
def test_bench_loader_on_cuda_times_the_decode_ceiling(train_beton):
    from click.testing import CliRunner

    from capfast.bench.loader import command

    result = CliRunner().invoke(command, ["--data", str(train_beton), "--device", "cuda", "--batch-size", "8",
                                          "--batches", "4", "--workers", "1", "--image-size", str(SIZE)])
    assert result.exit_code == 0, result.output
    values = dict(pair.split("=") for pair in result.output.strip().splitlines()[-1].split())
    assert float(values["ceiling_img_s"]) > 0 and float(values["ceiling_fraction"]) > 0
    assert float(values["mean_jpeg_kb"]) > 0
