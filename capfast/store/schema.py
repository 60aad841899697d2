"""The on-disk contract between `capfast convert` and everything that reads its output.

A converted data directory holds, per split NAME:
  NAME.beton        FFCV records: image (JPEG, baseline RGB), captions (int32 [K, max_len+2]),
                    ncaptions (how many rows of `captions` are real), image_id (COCO id), checksum (see below)
  refs_NAME.json    {"image_id": [raw reference captions, untruncated]} for evaluation
  attributes_NAME.json  (only for `capfast synth` data) {"image_id": {background, gradient_to, shapes: [{kind,
                    color, size, position}]}}: what each image shows, for attribute accuracy in `capfast eval`;
                    kind, color and position take the SHAPES, COLORS and POSITIONS below
  cider_NAME.npz    (written by SCST runs) the CIDEr-D reward's tables of refs_NAME.json, a cache
and once for the directory:
  vocab.json        the vocabulary (capfast.store.vocab.Vocab), built from the training split
  meta.json         {"format_version", "splits": {NAME: {source, settings, counts, skipped}}}
  features/CACHE/   (written by `capfast features`) a frozen trunk's features of some splits, for training with
                    data.features = CACHE: manifest.json and NAME.features (capfast.store.feature_cache)
  .lock             locked by the `capfast convert` writing the directory (capfast/common/lock.py)

Record checksums (format 2): each record's `checksum` field (an IntField, so it lives in the beton's metadata table,
beside the record's other metadata) holds record_checksum() of what the record stores: a CRC-32 (zlib's) of its
JPEG bytes, its caption rows and its height, width, ncaptions and image_id. A field rather than a file beside the
beton: a beton copied on its own keeps them, and ffcv's own Loader still reads it (pass `checksum: None` among its
pipelines to skip the field). `capfast inspect --verify` checks every record, `data.verify` each record read.
Format 1 betons (RECORD_FIELDS only, no checksum) still read everywhere; inspect --verify then checks their
structure only, and data.verify refuses them.
"""

import re
import struct
import zlib
from pathlib import Path

FORMAT_VERSION = 2  # 2: records carry a checksum
READABLE_FORMAT_VERSIONS = (1, 2)
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
JPG_MODE = 0  # the RGBImageField mode of a JPEG record (ffcv's IMAGE_MODES["jpg"])

# The scene words of `capfast synth` data: what attributes_NAME.json records and `capfast eval` parses captions for
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS = ("left", "right", "top", "bottom", "center")

IMAGE = "image"
CAPTIONS = "captions"
NCAPTIONS = "ncaptions"
IMAGE_ID = "image_id"
CHECKSUM = "checksum"
RECORD_FIELDS = (IMAGE, CAPTIONS, NCAPTIONS, IMAGE_ID)  # what a record holds (the whole of a format 1 beton)
FIELD_NAMES = RECORD_FIELDS + (CHECKSUM,)

VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"


def split_name_problem(name) -> str | None:
    """None for a valid split name (it becomes part of file names), else what a split name must be."""
    if isinstance(name, str) and SPLIT_NAME.fullmatch(name):
        return None
    return "a split name (letters, digits, _ - .)"


def beton_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"{split}.beton"


def refs_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"refs_{split}.json"


def attributes_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"attributes_{split}.json"


def cider_cache_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"cider_{split}.npz"


def beton_fields(captions_per_image: int, max_len: int, jpeg_quality: int = 90, checksums: bool = True) -> dict:
    """FFCV fields in the order they are written. Tokens per caption row: max_len + bos + eos. checksums=False: the
    format 1 layout (what ffcv's own DatasetWriter can write: it cannot compute a checksum of the JPEG it encodes)."""
    import numpy as np
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    fields = {
        IMAGE: RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality),
        CAPTIONS: NDArrayField(dtype=np.dtype("int32"), shape=(captions_per_image, max_len + 2)),
        NCAPTIONS: IntField(),
        IMAGE_ID: IntField(),
    }
    return {**fields, CHECKSUM: IntField()} if checksums else fields


def record_checksum(jpeg, captions, height: int, width: int, ncaptions: int, image_id: int) -> int:
    """The `checksum` field of a record: zlib's CRC-32 of its JPEG bytes, then its caption rows (the int32
    little-endian bytes of the whole [K, max_len+2] array, padding rows included), then height, width, ncaptions and
    image_id as little-endian int64. jpeg and captions: bytes-like objects. zlib.crc32 releases the GIL on large
    buffers, so threads check records in parallel."""
    crc = zlib.crc32(captions, zlib.crc32(jpeg))
    return zlib.crc32(struct.pack("<4q", height, width, ncaptions, image_id), crc)
