"""Writes a .beton in ffcv's file format, one record after another, from values that are ready to store.

ffcv's layout (ffcv/types.py, format version 2): header | field descriptors | metadata table (one row per record) |
data pages | allocation table. Records go into fixed-size, page-aligned pages in order, and a record never
straddles two pages (ffcv's readers need that), so the file's bytes depend only on the records: not on how many
processes produced them, unlike ffcv's DatasetWriter, whose worker processes claim pages in a racy order.

The values are encoded by ffcv's own field classes (`Field.encode(metadata_row, value, malloc)`); the image field is
`JpegField`, an RGBImageField whose values are JPEG bytes already encoded elsewhere. The file names it
RGBImageField, so ffcv's decoders and capfast's loader read it like any beton written by ffcv.

The metadata table is reserved for `capacity` records before the first page: rows of items that were skipped
stay unused zero bytes between the table and the first page. In memory the writer holds one page, the metadata
table and the allocation table (about 100 bytes per record); it never holds pixels.
"""

import array
import functools

import numpy as np

from capfast.errors import CapfastError
from capfast.store import schema

MIN_PAGE_SIZE = 1 << 21  # ffcv.writer.MIN_PAGE_SIZE: ffcv refuses smaller pages
LARGE_DATASET_PAGE_SIZE = 1 << 23  # ffcv's default page size, for datasets of LARGE_DATASET records or more
LARGE_DATASET = 2000


class PageFull(Exception):
    """Raised by malloc: the current record does not fit in what is left of the page."""


@functools.cache
def jpeg_field_class():
    """JpegField, built on first use so that importing this module does not import ffcv (seconds of numba)."""
    from ffcv.fields import RGBImageField

    class JpegField(RGBImageField):
        """RGBImageField in jpg mode whose values are (jpeg bytes, height, width): stored as they are."""

        def __init__(self):
            super().__init__(write_mode="jpg")

        def encode(self, destination, value, malloc):
            jpeg, height, width = value
            data_ptr, storage = malloc(len(jpeg))
            storage[:] = np.frombuffer(jpeg, dtype=np.uint8)
            destination[0] = (schema.JPG_MODE, width, height, data_ptr)  # metadata_type's order, in one assignment

    return JpegField


def page_size_for(largest_record: int, capacity: int) -> int:
    """ffcv needs every record inside one page (a power of two >= 2 MiB); large datasets get ffcv's default
    8 MiB pages, small ones small pages (the last page is padded to full size)."""
    wanted = max(MIN_PAGE_SIZE, 1 << (max(largest_record, 1) - 1).bit_length())
    return max(wanted, LARGE_DATASET_PAGE_SIZE) if capacity >= LARGE_DATASET else wanted


class BetonWriter:
    """`append` records (one value per field, in the fields' order), then `finish`. `file` is an empty binary
    file opened for writing and seeking; it is complete only after finish()."""

    def __init__(self, file, fields: dict, capacity: int, page_size: int):
        from ffcv.types import HeaderType, get_metadata_type
        from ffcv.utils import align_to_page

        self.file, self.fields, self.capacity, self.page_size = file, fields, capacity, page_size
        self.metadata = np.zeros(capacity, dtype=get_metadata_type(list(fields.values())))
        self.metadata_start = HeaderType.itemsize + len(fields) * field_descriptors(fields).itemsize
        self.data_start = align_to_page(self.metadata_start + self.metadata.nbytes, page_size)
        self.page = np.zeros(page_size, dtype=np.uint8)
        self.page_number, self.page_used = 0, 0
        self.allocations = array.array("Q")  # flat (record, file offset, size) triples: ffcv's ALLOC_TABLE_TYPE
        self.count = 0
        self.file.write(self.header(0, 0).tobytes())  # rewritten by finish()
        self.file.write(field_descriptors(fields).tobytes())

    def append(self, values) -> None:
        if self.count == self.capacity:
            raise ValueError(f"the writer was made for {self.capacity} records")
        page_used, allocations = self.page_used, len(self.allocations)
        try:
            self.encode(values)
        except PageFull:
            self.page_used = page_used  # start the record again on a fresh page
            del self.allocations[allocations:]
            if page_used == 0:
                raise self.too_large() from None
            self.write_page()
            try:
                self.encode(values)
            except PageFull:
                raise self.too_large() from None
        self.count += 1

    def encode(self, values) -> None:
        row = self.metadata[self.count:self.count + 1]
        for name, field, value in zip(row.dtype.names, self.fields.values(), values, strict=True):
            field.encode(row[name], value, self.malloc)

    def malloc(self, size: int):
        """ffcv's allocator interface: (file offset, writable buffer of `size` bytes) in the current page."""
        start = self.page_used
        if size > self.page_size - start:
            raise PageFull
        self.page_used += size
        offset = self.data_start + self.page_number * self.page_size + start
        self.allocations.extend((self.count, offset, size))
        return offset, self.page[start:start + size]

    def too_large(self) -> CapfastError:
        return CapfastError(f"record {self.count} is larger than the beton's {self.page_size}-byte pages")

    def write_page(self) -> None:
        self.page[self.page_used:] = 0
        self.file.seek(self.data_start + self.page_number * self.page_size)
        self.file.write(self.page.data)
        self.page_number, self.page_used = self.page_number + 1, 0

    def finish(self) -> None:
        from ffcv.types import ALLOC_TABLE_TYPE

        if self.page_used:
            self.write_page()
        table_start = self.data_start + self.page_number * self.page_size
        self.file.seek(table_start)
        self.file.write(np.frombuffer(self.allocations, dtype=ALLOC_TABLE_TYPE).tobytes())
        self.file.seek(self.metadata_start)
        self.file.write(self.metadata[:self.count].tobytes())
        self.file.seek(0)
        self.file.write(self.header(self.count, table_start).tobytes())
        self.file.flush()

    def header(self, records: int, table_start: int) -> np.ndarray:
        from ffcv.types import CURRENT_VERSION, HeaderType

        header = np.zeros(1, dtype=HeaderType)
        header["version"], header["num_fields"] = CURRENT_VERSION, len(self.fields)
        header["page_size"], header["num_samples"], header["alloc_table_ptr"] = self.page_size, records, table_start
        return header


def field_descriptors(fields: dict) -> np.ndarray:
    """ffcv's field table: each field's type id (that of its nearest ffcv ancestor class), name and arguments."""
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType

    type_ids = {handler: type_id for type_id, handler in TYPE_ID_HANDLER.items() if handler is not None}
    descriptors = np.zeros(len(fields), dtype=FieldDescType)
    for descriptor, (name, field) in zip(descriptors, fields.items()):
        descriptor["type_id"] = next(type_ids[cls] for cls in type(field).__mro__ if cls in type_ids)
        encoded = np.frombuffer(name.encode("ascii"), dtype=np.uint8)[:descriptor["name"].shape[0]]
        descriptor["name"][:len(encoded)] = encoded
        descriptor["arguments"][:] = field.to_binary()[0]
    return descriptors
