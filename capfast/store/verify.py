"""Checking a beton's records against their checksums (schema.record_checksum): `capfast inspect --verify` reads
the file once, in file order, a block per thread at a time, and hashes each block's records in one compiled loop
that calls zlib's crc32 without the GIL (in Python the work around each record's hash held the GIL about as long
as the hash itself: tools/results/2026-12-07_records-verify_2vcpu.md); `data.verify` checks the records of each
batch as the loader reads them."""

import ctypes
import ctypes.util
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from capfast.errors import CapfastError
from capfast.store import schema

VERIFY_BLOCK_BYTES = 1 << 25  # verify_records hashes the records of this much of the file at a time, per thread
_zlib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
_crc32 = _zlib.crc32  # zlib.crc32's C function: the same CRC-32, chained the same way
_crc32.restype = ctypes.c_ulong
_crc32.argtypes = (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint)


@numba.njit(nogil=True)  # not cached: numba cannot cache a function that calls through a ctypes pointer
def mismatches(data, image_ptr, image_size, caption_ptr, caption_nbytes, values):
    """Positions i (ascending) whose checksum, as schema.record_checksum computes it from the image bytes
    data[image_ptr[i]:][:image_size[i]], the caption rows data[caption_ptr[i]:][:caption_nbytes] and values[i, :4],
    differs from values[i, 4]. data: the file as uint8."""
    found = np.empty(len(image_ptr), np.int64)
    count = 0
    packed = np.empty(4, np.int64)  # height, width, ncaptions, image_id as little-endian int64 (as struct "<4q")
    packed_bytes = packed.view(np.uint8)
    for i in range(len(image_ptr)):
        crc = _crc32(0, data[image_ptr[i]:].ctypes.data, image_size[i])
        crc = _crc32(crc, data[caption_ptr[i]:].ctypes.data, caption_nbytes)
        for k in range(4):
            packed[k] = values[i, k]
        crc = _crc32(crc, packed_bytes.ctypes.data, 32)
        if crc != values[i, 4]:
            found[count] = i
            count += 1
    return found[:count]


@dataclass(frozen=True)
class Verification:
    records: int
    nbytes: int  # record bytes read and hashed
    seconds: float
    threads: int
    mismatched: np.ndarray  # indices of the records that do not match their checksum, ascending

    def to_json(self) -> dict:
        return {"records": self.records, "bytes": self.nbytes, "seconds": round(self.seconds, 3),
                "threads": self.threads, "mismatched": len(self.mismatched)}


class RecordLayout:
    """Where each record's bytes lie and what its checksum covers, as int64 arrays in record order."""

    def __init__(self, contents):  # a store.beton.BetonContents
        self.page_size = int(contents.reader.page_size)
        self.image_ptr = contents.image_meta["data_ptr"].astype(np.int64)
        self.image_size = contents.image_nbytes()
        self.caption_ptr, self.caption_nbytes = contents.caption_ptrs, contents.caption_nbytes
        self.values = np.stack([contents.image_meta["height"].astype(np.int64),
                                contents.image_meta["width"].astype(np.int64), contents.ncaptions,
                                contents.image_ids, contents.checksums], axis=1)
        data_end = int(contents.reader.header["alloc_table_ptr"])
        inside = ((self.image_size >= 0) & (self.image_ptr >= 0) & (self.image_ptr + self.image_size <= data_end)
                  & (self.caption_ptr >= 0) & (self.caption_ptr + self.caption_nbytes <= data_end))
        self.misplaced = np.flatnonzero(~inside)  # damaged metadata: no bytes to read, the record fails

    def blocks(self, block_bytes: int) -> list[np.ndarray]:
        """The readable records in file order, cut where a block of `block_bytes` (whole pages) begins."""
        readable = np.setdiff1d(np.arange(len(self.image_ptr)), self.misplaced)
        in_file_order = readable[np.argsort(self.image_ptr[readable], kind="stable")]
        pages_per_block = max(1, block_bytes // self.page_size)
        block = self.image_ptr[in_file_order] // self.page_size // pages_per_block
        return [records for records in np.split(in_file_order, np.flatnonzero(np.diff(block)) + 1) if len(records)]

    def span(self, records: np.ndarray) -> tuple[int, int]:
        """The file range [start, end) that holds all of `records`' bytes."""
        starts = np.minimum(self.image_ptr[records], self.caption_ptr[records])
        ends = np.maximum(self.image_ptr[records] + self.image_size[records],
                          self.caption_ptr[records] + self.caption_nbytes)
        return int(starts.min()), int(ends.max())


def block_mismatches(mapped: mmap.mmap, data: np.ndarray, layout: RecordLayout, records: np.ndarray,
                     spans: list[tuple[int, int]]) -> list[int]:
    """The records of one block whose bytes do not match their checksum, hashed straight from the mapped file
    (`data`: it as uint8). `spans`: this block's and the next one's, which the kernel is asked to read ahead while
    this thread hashes."""
    for start, end in spans:
        read_ahead(mapped, start, end)
    bad = mismatches(data, layout.image_ptr[records], layout.image_size[records], layout.caption_ptr[records],
                     layout.caption_nbytes, layout.values[records])
    return records[bad].tolist()


def read_ahead(mapped: mmap.mmap, start: int, end: int) -> None:
    """Asks the kernel to read [start, end) of the mapped file now, in the background, so that the disk works
    while the thread hashes (tools/results/2026-12-07_records-verify_2vcpu.md)."""
    if hasattr(mapped, "madvise"):
        aligned = start - start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_WILLNEED, aligned, end - aligned)


def record_mismatches(jpegs: list, captions, values: np.ndarray) -> list[int]:
    """Positions i where schema.record_checksum(jpegs[i], captions[i], *values[i, :4]) differs from values[i, 4];
    values: int64 [n, 5] of height, width, ncaptions, image_id and the stored checksum."""
    return [i for i, (jpeg, rows, (height, width, ncaptions, image_id, stored))
            in enumerate(zip(jpegs, captions, values.tolist()))
            if schema.record_checksum(jpeg, rows, height, width, ncaptions, image_id) != stored]


def verify_records(contents, threads: int | None = None) -> Verification:
    """Every record of a beton with checksums against them: the file is read once, in file order, a block of
    VERIFY_BLOCK_BYTES per thread at a time (`threads`: default one per core). contents: a store.beton.BetonContents."""
    if contents.checksums is None:
        raise ValueError(f"{contents.path} has no record checksums")
    layout = RecordLayout(contents)
    blocks = layout.blocks(VERIFY_BLOCK_BYTES)
    spans = [layout.span(records) for records in blocks]
    threads = threads or len(os.sched_getaffinity(0))
    started = time.perf_counter()
    with (open(contents.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
          ThreadPoolExecutor(threads, thread_name_prefix="capfast-verify") as pool):
        found = _blocks_mismatches(pool, mapped, layout, blocks, spans)
    seconds = time.perf_counter() - started
    mismatched = np.unique(np.concatenate([layout.misplaced, *map(np.asarray, found)]).astype(np.int64))
    nbytes = int(layout.image_size[layout.image_size > 0].sum()) + len(contents) * layout.caption_nbytes
    return Verification(len(contents), nbytes, seconds, threads, mismatched)


def _blocks_mismatches(pool, mapped: mmap.mmap, layout: RecordLayout, blocks: list, spans: list) -> list[list[int]]:
    """block_mismatches of every block on `pool`. Its array over the map is gone on return: the map cannot close
    while an array exports it."""
    data = np.frombuffer(mapped, np.uint8)
    return list(pool.map(lambda n: block_mismatches(mapped, data, layout, blocks[n], spans[n:n + 2]),
                         range(len(blocks))))


def mismatch_error(path, record: int, image_id: int, more: str | None = None) -> CapfastError:
    """The one-line error for a record whose bytes no longer match its checksum (`more`: which others fail too)."""
    also = f", and so do {more}" if more else ""
    return CapfastError(f"{path}: record {record} (image {image_id}) does not match its checksum{also}: the file "
                        f"changed after `capfast convert` wrote it (a damaged copy or disk); copy it again or convert "
                        f"the split again")
