"""One dataset item -> what `capfast convert` stores for it: the per-item work of convert's worker processes.

A worker tokenizes the item's captions and encodes them with the vocabulary, then decodes, normalizes, resizes
and JPEG-encodes its image (capfast/pack/images.py), and computes the record's checksum (schema.record_checksum).
An item without a usable caption or image comes back as the reason to skip it, so nothing bad reaches the beton.
"""

import collections
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from capfast.pack.images import BadImage, prepare_jpeg
from capfast.store import schema
from capfast.store.ptb_tokenizer import tokenize
from capfast.store.vocab import Vocab

NO_WORDS = "no caption contains a word"


@dataclass(frozen=True)
class RecordSettings:
    image_size: int
    keep_aspect: bool
    quality: int
    captions_per_image: int
    max_len: int


class Record(NamedTuple):  # a tuple: pickled back to the parent an order of magnitude faster than a dataclass
    jpeg: bytes
    height: int
    width: int
    captions: bytes  # int32 [captions_per_image, max_len + 2]; rows past ncaptions are padding
    ncaptions: int
    image_id: int
    checksum: int
    lengths: tuple[int, ...]  # tokens of each stored caption before it was cut to max_len

    def values(self) -> tuple:
        """The beton fields' values, in schema.FIELD_NAMES order."""
        return ((self.jpeg, self.height, self.width), np.frombuffer(self.captions, np.int32), self.ncaptions,
                self.image_id, self.checksum)


_worker = {}


def warm_up() -> None:
    """Compiles the tokenizer's rules (a second or more) in this process, so that the workers it forks
    inherit them instead of each compiling its own."""
    tokenize("A warm-up, with punctuation.")


def init_worker(settings: RecordSettings, vocab: Vocab) -> None:
    _worker["settings"], _worker["vocab"] = settings, vocab


def encode_item(job: tuple[str, list[str], int]) -> Record | str:
    """(image path, captions, image id) -> its Record, or the reason to skip it. Captions without word tokens
    ("...") carry nothing to learn and are left out of the rows."""
    path, captions, image_id = job
    settings, vocab = _worker["settings"], _worker["vocab"]
    rows = [tokens for tokens in map(tokenize, captions) if tokens][:settings.captions_per_image]
    if not rows:
        return NO_WORDS
    try:
        jpeg, height, width = prepare_jpeg(path, settings.image_size, settings.keep_aspect, settings.quality)
    except BadImage as e:
        return e.reason
    ids = np.full((settings.captions_per_image, settings.max_len + 2), vocab.pad_id, dtype=np.int32)
    for row, words in enumerate(rows):
        ids[row] = vocab.encode(words, settings.max_len)
    captions = ids.tobytes()
    checksum = schema.record_checksum(jpeg, captions, height, width, len(rows), image_id)
    return Record(jpeg, height, width, captions, len(rows), image_id, checksum, tuple(map(len, rows)))


def count_words(captions: list[str]) -> collections.Counter:
    """Token counts of some captions (for building the vocabulary in parallel)."""
    return collections.Counter(token for caption in captions for token in tokenize(caption))
