"""Validated, crash-safe beton writing for `capfast convert`.

Two passes, so that no bad image ever reaches ffcv's DatasetWriter (which hangs forever if a worker raises):
  1. normalize: a process pool runs capfast.images.prepare_image on every item; good arrays go to a
     temporary cache file in the output dir (one fixed-size slot per item, so workers write in place and memory
     stays bounded), bad ones come back as reasons.
  2. write: ffcv's DatasetWriter encodes the cached arrays (in item order) into a temporary beton, which is
     renamed onto OUT/NAME.beton only on success.
When the disk lacks room for the cache, pass 2 re-runs prepare_image instead of reading the cache.
"""

import ctypes
import multiprocessing
import os
import shutil
import tempfile
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import psutil  # installed with ffcv
from tqdm import tqdm

from capfast.errors import CapfastError
from capfast.images import BadImage, prepare_image
from capfast.io import atomic_path

DISK_MARGIN = 256 << 20  # keep this much free beyond the cache, for the beton itself


@dataclass(frozen=True)
class ImageSettings:
    size: int
    keep_aspect: bool

    @property
    def slot_bytes(self) -> int:  # with keep_aspect the longest side is `size`, so h*w <= size*size
        return self.size * self.size * 3


@dataclass
class Normalized:
    shapes: dict[int, tuple[int, int, int]]  # item index -> array shape, for the good items
    failures: dict[int, str]  # item index -> reason, for the bad ones
    cache: Path | None  # slot file, or None when arrays must be recomputed while writing


# ---- pass 1: validate + normalize in a pool --------------------------------------------------------------

_worker_state = {}


def _init_pool_worker(*args):
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would oversubscribe the cores
    _init_worker(*args)


def _init_worker(cache: Path | None, count: int, settings: ImageSettings):
    _worker_state["settings"] = settings
    _worker_state["slots"] = open_slots(cache, count, settings, "r+") if cache else None


def open_slots(cache: Path, count: int, settings: ImageSettings, mode: str) -> np.memmap:
    return np.memmap(cache, dtype=np.uint8, mode=mode, shape=(max(count, 1), settings.slot_bytes))


def _normalize_one(job: tuple[int, str]):
    index, path = job
    settings = _worker_state["settings"]
    try:
        array = prepare_image(path, settings.size, settings.keep_aspect)
    except BadImage as e:
        return index, None, e.reason
    slots = _worker_state["slots"]
    if slots is not None:
        slots[index, :array.size] = array.reshape(-1)
    return index, array.shape, None


def normalize_images(paths: list[Path], cache: Path | None, settings: ImageSettings, workers: int,
                     progress: bool) -> Normalized:
    """Runs prepare_image over `paths`, storing good arrays in `cache` (from `normalization_cache`)."""
    result = Normalized({}, {}, cache)
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    bar = tqdm(total=len(jobs), desc="validate+resize", unit="img", disable=not progress, leave=False)
    try:
        for index, shape, reason in run_jobs(jobs, cache, settings, workers):
            if reason is None:
                result.shapes[index] = shape
            else:
                result.failures[index] = reason
            bar.update()
    finally:
        bar.close()
    return result


def run_jobs(jobs, cache, settings: ImageSettings, workers: int):
    init_args = (cache, len(jobs), settings)
    if workers <= 1:
        _init_worker(*init_args)
        try:
            yield from map(_normalize_one, jobs)
        finally:
            _worker_state.clear()
        return
    chunksize = max(1, min(32, len(jobs) // (workers * 8)))
    with multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=init_args) as pool:
        yield from pool.imap_unordered(_normalize_one, jobs, chunksize=chunksize)


@contextmanager
def normalization_cache(out_dir: Path, count: int, settings: ImageSettings):
    """A temporary slot file for `count` arrays in out_dir, deleted however the block ends; None (recompute
    while writing) when the disk lacks room for it."""
    if shutil.disk_usage(out_dir).free < count * settings.slot_bytes + DISK_MARGIN:
        yield None
        return
    fd, name = tempfile.mkstemp(prefix=".normalized.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    path = Path(name)
    try:
        open_slots(path, count, settings, "w+").flush()
        yield path
    finally:
        path.unlink(missing_ok=True)


# ---- pass 2: the indexed dataset handed to ffcv's writer ------------------------------------------------

class Records:
    """Record j = (image uint8 HxWx3, captions int32 [K, L], ncaptions, image_id) of the j-th good item."""

    def __init__(self, item_indices, paths, normalized: Normalized, settings: ImageSettings,
                 captions: np.ndarray, ncaptions: np.ndarray, image_ids: np.ndarray):
        self.item_indices = list(item_indices)
        self.paths = [str(paths[i]) for i in self.item_indices]
        self.shapes = [normalized.shapes[i] for i in self.item_indices]
        self.cache, self.slot_count = normalized.cache, len(paths)
        self.settings = settings
        self.captions, self.ncaptions, self.image_ids = captions, ncaptions, image_ids
        self.changed = multiprocessing.Value(ctypes.c_int64, 0)  # images that failed on the second read
        self._slots = None

    def __len__(self):
        return len(self.item_indices)

    def __getitem__(self, j):
        return self.image(j), self.captions[j], int(self.ncaptions[j]), int(self.image_ids[j])

    def image(self, j) -> np.ndarray:
        shape = self.shapes[j]
        if self.cache is not None:
            if self._slots is None:  # opened lazily, inside each writer process
                self._slots = open_slots(self.cache, self.slot_count, self.settings, "r")
            size = shape[0] * shape[1] * shape[2]
            return np.array(self._slots[self.item_indices[j], :size]).reshape(shape)
        try:
            array = prepare_image(self.paths[j], self.settings.size, self.settings.keep_aspect)
            if array.shape == shape:
                return array
        except BadImage:
            pass
        # Never raise inside ffcv's writer (it would hang); count it and fail after writing instead.
        with self.changed.get_lock():
            self.changed.value += 1
        return np.zeros(shape, dtype=np.uint8)


# ---- running ffcv's writer safely -----------------------------------------------------------------------

def write_beton(final: Path, fields: dict, records: Records, workers: int) -> None:
    """Writes `records` to a temporary beton beside `final` and renames it on success only."""
    with atomic_path(final) as tmp:
        writer = make_writer(str(tmp), fields, page_size(records), max(1, workers))
        with writer_watchdog(writer):
            writer.from_indexed_dataset(records, chunksize=chunk_size(len(records), workers))
        if records.changed.value:
            raise CapfastError(f"{records.changed.value} image(s) changed or vanished during conversion; "
                               "run convert again")


def make_writer(fname: str, fields: dict, page_bytes: int, workers: int):
    """ffcv's DatasetWriter whose worker processes raise a shared flag when they fail (see writer_watchdog)."""
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    class FlaggingWriter(DatasetWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.failed = multiprocessing.Value(ctypes.c_int, 0)

        def from_indexed_dataset(self, dataset, chunksize=100):
            indices = list(enumerate(range(len(dataset))))
            self._write_common(len(indices), chunks(indices, chunksize), _flagging_worker_job,
                               (dataset, self.failed))

    return FlaggingWriter(fname, fields, page_size=page_bytes, num_workers=workers)


def _flagging_worker_job(*args):
    from ffcv.writer import worker_job_indexed_dataset

    *ffcv_args, failed = args
    try:
        worker_job_indexed_dataset(*ffcv_args)
    except BaseException:
        failed.value = 1
        raise


def page_size(records: Records) -> int:
    """ffcv needs every record inside one page. Allow 2x the raw image (JPEG of noise at q100 can exceed raw
    size), and keep small datasets on small pages: each writer process pads its last page."""
    from ffcv.writer import MIN_PAGE_SIZE

    largest_record = 2 * records.settings.slot_bytes + records.captions[0].nbytes
    wanted = max(MIN_PAGE_SIZE, 1 << (largest_record - 1).bit_length())
    return max(wanted, 4 * MIN_PAGE_SIZE) if len(records) >= 2000 else wanted  # ffcv default for big sets


def chunk_size(count: int, workers: int) -> int:
    return max(1, min(100, count // (max(1, workers) * 4)))


@contextmanager
def writer_watchdog(writer):
    """ffcv's writer spins forever once a worker dies (an error in a record, disk full, OOM kill). A watcher
    thread notices the worker's failure flag or a nonzero exit and sends us SIGINT (which, unlike
    _thread.interrupt_main, also wakes blocking reads); we then clean up and raise CapfastError."""
    if threading.current_thread() is not threading.main_thread():
        yield  # SIGINT only reaches the main thread; elsewhere we cannot interrupt ffcv's wait loop
        return
    before = {child.pid for child in psutil.Process().children()}
    stop, crashed = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(writer.failed, before, stop, crashed), daemon=True)
    watcher.start()
    try:
        yield
    except BaseException as e:
        stop.set()
        stop_children(before)
        release_shared_memory(writer)
        if crashed and isinstance(e, KeyboardInterrupt):
            raise CapfastError(f"an ffcv writer process failed ({crashed[0]}; its error is printed above); "
                               "no beton was written") from None
        raise
    finally:
        stop.set()
        watcher.join()


def _watch(failed, before: set, stop: threading.Event, crashed: list) -> None:
    while not stop.wait(0.2):
        problem = "it raised an exception" if failed.value else failed_child(before)
        if problem and not stop.is_set():
            crashed.append(problem)
            os.kill(os.getpid(), signal.SIGINT)
            return


def failed_child(before: set) -> str | None:
    """Best effort for workers killed without raising: a child that exited nonzero, inspected without
    reaping it (WNOWAIT), so multiprocessing's own bookkeeping is untouched."""
    for child in psutil.Process().children():
        if child.pid in before:
            continue
        try:
            info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            continue
        if info is not None and info.si_status != 0:
            how = "exit code" if info.si_code == os.CLD_EXITED else "signal"
            return f"{how} {info.si_status}"
    return None


def stop_children(before: set) -> None:
    for child in psutil.Process().children():
        if child.pid not in before:
            child.terminate()
    for child in multiprocessing.active_children():  # reap what we terminated
        child.join(timeout=5)


def release_shared_memory(writer) -> None:
    shared = getattr(writer, "metadata_sm", None)
    if shared is None or isinstance(shared, int):  # ffcv sets a placeholder int before allocating it
        return
    try:
        shared.close()
        shared.unlink()
    except OSError:
        pass  # already released
