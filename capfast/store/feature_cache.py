"""A frozen trunk's features, computed once by `capfast features` and stored beside the betons they came from.

DATA/features/NAME/
  manifest.json        {"format", "version", "trunk": TrunkId, "dtype", "shape": [S, width], "views", "splits":
                       {SPLIT: {"records", "source"}}}: a split is listed once its file is complete, never before
  SPLIT.features       [records, views, S, width] in the manifest's dtype, raw and C-ordered: read memory-mapped
                       through the page cache, never held whole (ViT-B/16 on COCO's train split: ~34 GB in fp16)
  SPLIT.features.partial, SPLIT.done, SPLIT.source.json
                       while SPLIT is written: the file, one byte per record set once its rows are on disk, and
                       the beton's fingerprint they were computed from (a rerun on changed data starts afresh)

Views: "center" is the evaluation transform (the whole image resized to image_size²), "flip" its mirror image.
"source" is the split's beton fingerprint (store.beton.data_fingerprint): features of changed data are refused.
The trunk is named by TrunkId; a model reads a cache only if its own TrunkId is the same.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capfast.common.io import atomic_write_text, read_json
from capfast.errors import CapfastError

FORMAT, VERSION = "capfast-features", 1
FOLDER = "features"
MANIFEST = "manifest.json"
VIEWS = ("center", "flip")
# dtype names -> the numpy dtype the file holds (bfloat16 as its 16 bits: numpy has no bfloat16)
DTYPES = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "fp32": np.dtype(np.float32)}


@dataclass(frozen=True)
class TrunkId:
    """What must match between a cache and the model that reads it."""

    encoder: str
    weights: str          # sha256 of the trunk's state_dict (models.encoder.trunk_fingerprint)
    image_size: int
    normalization: dict   # {"mean": [...], "std": [...]}
    encoder_depth: int
    class_token: str


def cache_dir(data_dir, name: str) -> Path:
    return Path(data_dir) / FOLDER / name


def name_problem(name) -> str | None:
    """An option() check: None for a usable cache name (a folder name)."""
    if isinstance(name, str) and (name == "" or (name not in (".", "..") and "/" not in name and name.strip())):
        return None
    return "a folder name under DATA/features (no '/')"


class FeatureCache:
    """A cache's manifest and files. Reading: FeatureCache.open(data_dir, name).split(SPLIT)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest

    @classmethod
    def open(cls, data_dir, name: str) -> "FeatureCache":
        path = cache_dir(data_dir, name)
        if not (path / MANIFEST).is_file():
            raise CapfastError(f"no feature cache {name!r} in {path.parent} (make it with `capfast features "
                               f"--data {data_dir} --name {name} ...`)")
        manifest = read_json(path / MANIFEST, "feature cache manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CapfastError(f"{path / MANIFEST} is not a manifest of `capfast features`")
        if manifest.get("version") != VERSION:
            raise CapfastError(f"{path} is feature cache version {manifest.get('version')}, this capfast reads "
                               f"{VERSION}; make it again")
        return cls(path, manifest)

    @classmethod
    def create(cls, data_dir, name: str, trunk: TrunkId, dtype: str, shape: tuple, views: tuple) -> "FeatureCache":
        """The cache NAME for this trunk and layout: a new one, or the one there if it was made alike (a rerun
        completes it); one made otherwise is refused."""
        manifest = {"format": FORMAT, "version": VERSION, "trunk": dataclasses.asdict(trunk), "dtype": dtype,
                    "shape": [int(s) for s in shape], "views": list(views), "splits": {}}
        path = cache_dir(data_dir, name)
        if (path / MANIFEST).exists():
            cache = cls.open(data_dir, name)
            mine = {k: v for k, v in manifest.items() if k != "splits"}
            if {k: cache.manifest.get(k) for k in mine} != mine:
                raise CapfastError(f"{path} holds features made otherwise ({cache.describe()}); choose another "
                                   f"--name or remove it")
            return cache
        cache = cls(path, manifest)
        cache.write_manifest()
        return cache

    # ---- what it holds ------------------------------------------------------------------------------------

    @property
    def trunk(self) -> TrunkId:
        return TrunkId(**self.manifest["trunk"])

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def shape(self) -> tuple:
        return tuple(self.manifest["shape"])

    @property
    def views(self) -> tuple:
        return tuple(self.manifest["views"])

    def describe(self) -> str:
        t = self.manifest["trunk"]
        return (f"{t['encoder']} depth {t['encoder_depth'] or 'all'}, class token {t['class_token']}, "
                f"{t['image_size']}², weights {t['weights'][:12]}, {self.manifest['dtype']}, views "
                f"{'+'.join(self.manifest['views'])}")

    def check_trunk(self, trunk: TrunkId, reader: str) -> None:
        """The cache was made by the trunk `reader` has: a one-line error naming what differs."""
        differences = [f"{field.name} {getattr(self.trunk, field.name)} (cache) vs {getattr(trunk, field.name)}"
                       for field in dataclasses.fields(TrunkId)
                       if getattr(self.trunk, field.name) != getattr(trunk, field.name)]
        if differences:
            raise CapfastError(f"feature cache {self.path} was not made by {reader}'s trunk: "
                               f"{'; '.join(differences)}")

    def features_path(self, split: str) -> Path:
        return self.path / f"{split}.features"

    def record_bytes(self) -> int:
        return int(np.prod(self.shape)) * len(self.views) * self.dtype.itemsize

    def split(self, split: str, source: dict) -> np.memmap:
        """The features of a complete split whose beton still has fingerprint `source`, memory-mapped
        [records, views, S, width]; a one-line error for a split that is missing, incomplete, cut short or stale."""
        entry = self.manifest["splits"].get(split)
        path = self.features_path(split)
        if entry is None:
            state = "is being written or was cut short" if path.with_suffix(".features.partial").exists() \
                else "is not in it"
            raise CapfastError(f"feature cache {self.path}: split {split!r} {state} (run `capfast features` for it)")
        expected = entry["records"] * self.record_bytes()
        size = path.stat().st_size if path.is_file() else 0
        if size != expected:
            raise CapfastError(f"feature cache {path} is truncated or damaged ({size} bytes, expected {expected}); "
                               f"run `capfast features` for split {split!r} again")
        if entry["source"] != source:
            raise CapfastError(f"feature cache {self.path}: split {split!r} changed since its features were made "
                               f"(records {entry['source']['records']} -> {source['records']}); make them again")
        return np.memmap(path, dtype=self.dtype, mode="r",
                         shape=(entry["records"], len(self.views), *self.shape))

    # ---- writing ------------------------------------------------------------------------------------------

    def write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")

    def add_split(self, split: str, records: int, source: dict) -> None:
        """Lists `split` as complete (its file is in place)."""
        self.manifest = read_json(self.path / MANIFEST, "feature cache manifest")  # others may have added theirs
        self.manifest["splits"][split] = {"records": int(records), "source": source}
        self.write_manifest()


class SplitWriter:
    """Writes one split's features in any order, from any number of processes, safe to kill: records go into
    SPLIT.features.partial, a record's byte in SPLIT.done is set only after its rows are fsynced, and finish()
    renames the file into place once every byte is set. A rerun skips the records already done."""

    def __init__(self, cache: FeatureCache, split: str, source: dict):
        self.cache, self.split, self.source, self.records = cache, split, source, int(source["records"])
        self.final = cache.features_path(split)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.done_path = self.final.with_name(f"{split}.done")
        self.source_path = self.final.with_name(f"{split}.source.json")

    def prepare(self) -> None:
        """Rank 0, before the others open it: the partial file at its full size and an empty done map, unless a
        run cut short left them for the same data."""
        if self._resumable():
            return
        self.done_path.unlink(missing_ok=True)
        with open(self.partial, "wb") as f:
            f.truncate(self.records * self.cache.record_bytes())
        with open(self.done_path, "wb") as f:
            f.truncate(self.records)
        atomic_write_text(self.source_path, json.dumps(self.source))

    def _resumable(self) -> bool:
        try:
            same_source = json.loads(self.source_path.read_text()) == self.source
        except (OSError, ValueError):
            return False
        return (same_source and self.partial.is_file() and self.done_path.is_file()
                and self.partial.stat().st_size == self.records * self.cache.record_bytes()
                and self.done_path.stat().st_size == self.records)

    def done(self) -> np.ndarray:
        """bool [records]: whose features are on disk."""
        return np.fromfile(self.done_path, dtype=np.uint8).astype(bool)

    def write(self, first: int, rows: np.ndarray) -> None:
        """Rows [n, views, S, width] of records first..first+n-1."""
        rows = np.ascontiguousarray(rows, dtype=self.cache.dtype)
        _pwrite_synced(self.partial, rows.tobytes(), first * self.cache.record_bytes())
        _pwrite_synced(self.done_path, b"\1" * len(rows), first)

    def finish(self) -> None:
        """Rank 0, once every rank is done: the file in place, then the manifest lists the split."""
        missing = np.flatnonzero(~self.done())
        if len(missing):
            raise CapfastError(f"{self.partial}: {len(missing)} records have no features yet (first: record "
                               f"{int(missing[0])}); run `capfast features` again to complete it")
        os.replace(self.partial, self.final)
        self.done_path.unlink(missing_ok=True)
        self.source_path.unlink(missing_ok=True)
        self.cache.add_split(self.split, self.records, self.source)


def _pwrite_synced(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        os.fdatasync(fd)
    finally:
        os.close(fd)
