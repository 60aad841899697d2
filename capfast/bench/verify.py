"""`capfast bench verify`: the rate of `capfast inspect --verify` (store.verify.verify_records) against one plain
sequential read of the same file, in the same run.

The baseline reads the whole file once, in 16 MiB blocks on one thread, and does nothing with the bytes: what the
disk, or the page cache, gives. verify_records reads every record and hashes it on a thread per core (--threads).
Both rates are the file's size over the time taken, so a ratio of 1 is "at disk speed".

--cold drops the file's pages from the page cache before each timed run (fsync, then posix_fadvise DONTNEED: no root
needed; pages another process maps stay), so both read the disk; without it the file is read once first and both
read the page cache. --repeat N first writes a beton of --data's records repeated N times (checksums included) into
--work-dir: a COCO-sized file from a small one; it is deleted afterwards. The work directory must be on the disk to
measure (not a tmpfs).
"""

import os
import tempfile
import time
from pathlib import Path

import click

from capfast.errors import CapfastError

READ_BLOCK = 1 << 24


def read_once(path: Path) -> float:
    """Seconds to read the whole file once, sequentially, into one reused buffer."""
    view = memoryview(bytearray(READ_BLOCK))
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.readinto(view):
            pass
    return time.perf_counter() - started


def drop_cached(path: Path) -> None:
    """Evicts the file's pages from the page cache (dirty ones are written first, or they would stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def repeated_beton(source: Path, times: int, out: Path) -> Path:
    """A beton holding the records of `source` `times` over, in order, each with its stored checksum."""
    from capfast.common.progress import track
    from capfast.pack.beton_writer import BetonWriter, jpeg_field_class, page_size_for
    from capfast.store import schema
    from capfast.store.beton import BetonContents

    contents = BetonContents(source)
    if contents.checksums is None:
        raise CapfastError(f"{source} has no record checksums: convert it again first")
    k, row = contents.caption_shape
    fields = {**schema.beton_fields(k, row - 2), schema.IMAGE: jpeg_field_class()()}
    largest = int(contents.image_nbytes().max()) + contents.caption_nbytes
    capacity = times * len(contents)
    records = [record_values(contents, i) for i in range(len(contents))]
    with open(out, "w+b") as file:
        writer = BetonWriter(file, fields, capacity, page_size_for(largest, capacity))
        for n in track(range(capacity), capacity, "write repeated beton", "rec"):
            writer.append(records[n % len(records)])
        writer.finish()
    return out


def record_values(contents, i: int) -> tuple:
    width, height = contents.image_size(i)
    return ((contents.image_bytes(i), height, width), contents.captions(i), int(contents.ncaptions[i]),
            int(contents.image_ids[i]), int(contents.checksums[i]))


def timed_verify(path: Path, threads: int | None):
    from capfast.store.beton import BetonContents
    from capfast.store.verify import verify_records

    verification = verify_records(BetonContents(path), threads)
    if len(verification.mismatched):
        raise CapfastError(f"{path}: {len(verification.mismatched)} records do not match their checksums")
    return verification


def measure(path: Path, threads: int | None, cold: bool, rounds: int) -> dict:
    """Best seconds of each over `rounds` interleaved runs, and what verify reported."""
    if not cold:
        read_once(path)  # into the page cache
    best = {"read": float("inf"), "verify": float("inf")}
    verification = None
    for _ in range(rounds):
        if cold:
            drop_cached(path)
        best["read"] = min(best["read"], read_once(path))
        if cold:
            drop_cached(path)
        verification = timed_verify(path, threads)
        best["verify"] = min(best["verify"], verification.seconds)
    return {**best, "verification": verification}


@click.command()
@click.option("--data", "beton", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A .beton from capfast convert (with record checksums).")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measure a beton of --data's records repeated this many times (written to --work-dir first).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where --repeat writes its beton [default: the system's temporary directory].")
@click.option("--cold", is_flag=True, help="Drop the file from the page cache before each timed read.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Verify threads [default: all cores].")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Runs of each, interleaved; the best counts.")
def command(beton, repeat, work_dir, cold, threads, rounds):
    """inspect --verify's MB/s against one plain sequential read of the same file (a ratio of 1: disk speed)."""
    if repeat == 1:
        report(beton, measure(beton, threads, cold, rounds), cold)
        return
    with tempfile.TemporaryDirectory(prefix="capfast-bench-verify-", dir=work_dir) as scratch:
        path = repeated_beton(beton, repeat, Path(scratch) / "repeated.beton")
        report(path, measure(path, threads, cold, rounds), cold)


def report(path: Path, result: dict, cold: bool) -> None:
    verification, size = result["verification"], path.stat().st_size
    read_mb_s, verify_mb_s = size / 1e6 / result["read"], size / 1e6 / result["verify"]
    cache = "cold (page cache dropped before each)" if cold else "warm (page cache)"
    click.echo(f"{path}: {size / 1e6:.1f} MB, {verification.records} records, {cache}")
    click.echo(f"plain sequential read, 1 thread: {read_mb_s:.0f} MB/s")
    click.echo(f"verify, {verification.threads} threads: {verify_mb_s:.0f} MB/s "
               f"({verification.records / result['verify']:.0f} records/s): {verify_mb_s / read_mb_s:.2f}x the read")
    click.echo(f"verify_mb_s={verify_mb_s:.1f} read_mb_s={read_mb_s:.1f} ratio={verify_mb_s / read_mb_s:.3f} "
               f"bytes={size} records={verification.records} threads={verification.threads} "
               f"cache={'cold' if cold else 'warm'}")
