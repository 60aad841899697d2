"""capfast.pack.beton_writer (ffcv's .beton layout, written in order), capfast.pack.pool (the ordered worker pool)."""

import os

import numpy as np
import pytest

from capfast.errors import CapfastError
from capfast.pack.beton_writer import MIN_PAGE_SIZE, BetonWriter, jpeg_field_class, page_size_for
from capfast.pack.pool import ordered_map
from capfast.store import schema
from capfast.store.beton import BetonContents
from capfast.store.verify import verify_records


def fields():
    return {**schema.beton_fields(captions_per_image=2, max_len=4), schema.IMAGE: jpeg_field_class()()}


def record(i: int, nbytes: int) -> tuple:
    jpeg, captions, ncaptions, image_id = bytes([i]) * nbytes, np.full((2, 6), i, np.int32), 1 + i % 2, 100 + i
    checksum = schema.record_checksum(jpeg, captions, 10 + i, 20 + i, ncaptions, image_id)
    return (jpeg, 10 + i, 20 + i), captions, ncaptions, image_id, checksum


def write(path, records, capacity=None, page_size=MIN_PAGE_SIZE):
    with open(path, "w+b") as file:
        writer = BetonWriter(file, fields(), capacity or len(records), page_size)
        for values in records:
            writer.append(values)
        writer.finish()
    return path


def test_records_fill_whole_pages_in_order_and_ffcv_reads_them(tmp_path):
    sizes = [600_000 + i for i in range(7)]  # three fit in a 2 MiB page: the 4th and 7th start new pages
    path = write(tmp_path / "x.beton", [record(i, n) for i, n in enumerate(sizes)], capacity=9)
    contents = BetonContents(path)  # ffcv's Reader, and the fields capfast expects (image: RGBImageField)
    assert len(contents) == 7 and contents.image_ids.tolist() == list(range(100, 107))
    assert contents.ncaptions.tolist() == [1, 2] * 3 + [1]
    for i, n in enumerate(sizes):
        assert contents.image_bytes(i) == bytes([i]) * n
        assert contents.image_size(i) == (20 + i, 10 + i)
        assert (contents.captions(i) == i).all()
    table = contents.reader.alloc_table
    first_page, last_page = table["ptr"] // MIN_PAGE_SIZE, (table["ptr"] + table["size"] - 1) // MIN_PAGE_SIZE
    assert (first_page == last_page).all()  # no record straddles two pages
    assert sorted(set(first_page.tolist())) == [first_page.min() + k for k in range(3)]
    assert os.path.getsize(path) == (first_page.min() + 3) * MIN_PAGE_SIZE + table.nbytes


def test_verify_reads_every_page_on_threads_and_names_each_damaged_record(tmp_path, monkeypatch):
    from capfast.store import verify

    sizes = [600_000 + i for i in range(7)]  # three pages: with one page per block, three blocks on two threads
    path = write(tmp_path / "x.beton", [record(i, n) for i, n in enumerate(sizes)])
    monkeypatch.setattr(verify, "VERIFY_BLOCK_BYTES", 1)
    assert verify_records(BetonContents(path), threads=2).mismatched.tolist() == []
    contents = BetonContents(path)
    damaged = bytearray(path.read_bytes())
    damaged[int(contents.image_meta["data_ptr"][4]) + 1000] ^= 0x01  # record 4's image, on the second page
    damaged[int(contents.caption_ptrs[6]) + 5] ^= 0x80  # record 6's caption rows, on the third
    path.write_bytes(bytes(damaged))
    verification = verify_records(BetonContents(path), threads=2)
    assert verification.mismatched.tolist() == [4, 6]
    assert verification.records == 7 and verification.nbytes == sum(sizes) + 7 * 2 * 6 * 4


def test_record_larger_than_a_page_is_an_error(tmp_path):
    with pytest.raises(CapfastError, match="larger than the beton's 2097152-byte pages"):
        write(tmp_path / "x.beton", [record(0, 10), record(1, MIN_PAGE_SIZE)])


def test_page_size_fits_the_largest_record():
    assert page_size_for(1000, capacity=10) == MIN_PAGE_SIZE
    assert page_size_for(1000, capacity=5000) == 4 * MIN_PAGE_SIZE  # ffcv's default for large datasets
    assert page_size_for(3 * MIN_PAGE_SIZE, capacity=10) == 4 * MIN_PAGE_SIZE


def square(x):
    return x * x


def die(x):
    os._exit(3)  # like an OOM kill: no exception, no message


def test_ordered_map_keeps_input_order():
    assert list(ordered_map(square, list(range(40)), workers=2, chunk_size=3)) == [x * x for x in range(40)]


def test_dead_worker_becomes_error():
    with pytest.raises(CapfastError, match="worker process died"):
        list(ordered_map(die, [1, 2, 3], workers=2))
