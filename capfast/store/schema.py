"""The on-disk contract between `capfast convert` and everything that reads its output.

A converted data directory holds, per split NAME:
  NAME.beton        FFCV records: image (JPEG, baseline RGB), captions (int32 [K, max_len+2]),
                    ncaptions (how many rows of `captions` are real), image_id (COCO id)
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
"""

import re
from pathlib import Path

FORMAT_VERSION = 1
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
FIELD_NAMES = (IMAGE, CAPTIONS, NCAPTIONS, IMAGE_ID)

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


def beton_fields(captions_per_image: int, max_len: int, jpeg_quality: int = 90) -> dict:
    """FFCV fields in the order they are written. Tokens per caption row: max_len + bos + eos."""
    import numpy as np
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    return {
        IMAGE: RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality),
        CAPTIONS: NDArrayField(dtype=np.dtype("int32"), shape=(captions_per_image, max_len + 2)),
        NCAPTIONS: IntField(),
        IMAGE_ID: IntField(),
    }
