"""The on-disk contract between `capfast convert` and everything that reads its output.

A converted data directory holds, per split NAME:
  NAME.beton        FFCV records: image (JPEG, baseline RGB), captions (int32 [K, max_len+2]),
                    ncaptions (how many rows of `captions` are real), image_id (COCO id)
  refs_NAME.json    {"image_id": [raw reference captions, untruncated]} for evaluation
and once for the directory:
  vocab.json        the vocabulary (capfast.vocab.Vocab), built from the training split
  meta.json         {"format_version", "splits": {NAME: {source, settings, counts, skipped}}}
"""

from pathlib import Path

FORMAT_VERSION = 1

IMAGE = "image"
CAPTIONS = "captions"
NCAPTIONS = "ncaptions"
IMAGE_ID = "image_id"
FIELD_NAMES = (IMAGE, CAPTIONS, NCAPTIONS, IMAGE_ID)

VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"


def beton_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"{split}.beton"


def refs_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"refs_{split}.json"


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
