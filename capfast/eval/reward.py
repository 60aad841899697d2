"""The SCST reward of a data directory: CIDEr-D against its training references, tables cached beside the data.

The references (refs_SPLIT.json, raw captions as `capfast convert` wrote them) are PTB-tokenized the way the
COCO caption evaluation tokenizes them, mapped to vocabulary ids and turned into CIDEr-D tables once; the tables
go to cider_SPLIT.npz in the data directory, keyed by a hash of the references file and the vocabulary, so
they are rebuilt when either changes. A read-only data directory just means rebuilding at every start.
"""

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from capfast.common.io import atomic_path
from capfast.eval.cider import CiderD, build_tables, encode_references
from capfast.store import schema
from capfast.store.references import require_references
from capfast.store.vocab import Vocab

CACHE_VERSION = 1
log = logging.getLogger(__name__)


def load_reward(data_dir, split: str, vocab: Vocab, *, write_cache: bool = True) -> CiderD:
    """CIDEr-D with the document frequencies of `split`'s references, from the cache when it is current."""
    refs_file = require_references(data_dir, split, "SCST")
    key = _cache_key(refs_file, vocab)
    cached = _read_cache(schema.cider_cache_path(data_dir, split), key)
    if cached is not None:
        return CiderD(cached)
    tables = tables_from_references(refs_file, vocab)
    if write_cache:
        _write_cache(schema.cider_cache_path(data_dir, split), key, tables)
    return CiderD(tables)


def tables_from_references(refs_file: Path, vocab: Vocab) -> dict:
    from capfast.store.ptb_tokenizer import tokenize_references
    from capfast.store.references import load_references

    tokenized = tokenize_references(load_references(refs_file))  # in file order, as pycocoevalcap sees a split
    return build_tables(*encode_references(tokenized, vocab.words))


def _cache_key(refs_file: Path, vocab: Vocab) -> str:
    digest = hashlib.sha1(refs_file.read_bytes()).hexdigest()
    return f"v{CACHE_VERSION}-{digest}-{vocab.fingerprint()}"


def _read_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in data.files if name != "key"}
    except (OSError, ValueError, KeyError):  # a foreign or damaged file: rebuild it
        return None


def _write_cache(path: Path, key: str, tables: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), **tables)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    except OSError as e:
        log.warning("could not cache the CIDEr-D tables at %s (%s); they will be rebuilt next time", path, e)
