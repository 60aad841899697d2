"""`capfast inspect FILE.beton [--verify]`: what a beton written by `capfast convert` holds, and whether its
records are still the bytes convert wrote.

Reusable API:
  check_beton(path) -> ffcv.reader.Reader   raises CapfastError unless `path` is a whole capfast beton ("truncated"
                                            when it is shorter than its header says)
  describe_beton(path) -> dict              records, fields, vocab size, caption/image statistics, examples
  BetonContents(path)                       random access to raw records without ffcv's Loader (no JIT)
  check_token_ids, check_jpeg_markers       every record's token ids in the vocabulary, every image a whole JPEG
  verify_records(contents) -> Verification  every record against its checksum (schema.record_checksum), the file
                                            mapped and read once, in blocks, by a thread per core
  data_fingerprint(path) -> dict            records, bytes and a hash: what a resumed run checks is unchanged

Without --verify inspect reads the metadata, the allocation table and two bytes at each end of every JPEG, so it
stays fast on any size; --verify reads every byte of every record.
"""

import hashlib
import json
from pathlib import Path

import click
import numpy as np

from capfast.common.runtime import prepare_process
from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.verify import Verification, mismatch_error, verify_records
from capfast.store.vocab import Vocab

EXPECTED_TYPES = {schema.IMAGE: "RGBImageField", schema.CAPTIONS: "NDArrayField",
                  schema.NCAPTIONS: "IntField", schema.IMAGE_ID: "IntField", schema.CHECKSUM: "IntField"}
PAGED_FIELDS = (schema.IMAGE, schema.CAPTIONS)  # the fields stored in data pages: one allocation each per record
INCOMPATIBLE = "written by an incompatible capfast convert version"
STATS_CHUNK = 4096
JPEG_START, JPEG_END = np.array([0xFF, 0xD8], np.uint8), np.array([0xFF, 0xD9], np.uint8)
FINGERPRINT_BYTES = 1 << 20


def check_beton(path):
    """The parsed ffcv Reader of `path` if it is a beton as capfast/store/schema.py defines; CapfastError otherwise:
    "beton not found", "not a beton", "missing field X", "written by an incompatible ... version"."""
    prepare_process()  # before ffcv's first import in this process
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise CapfastError(f"beton not found: {path}")
    check_header(path)
    try:
        reader = Reader(str(path))
    except Exception as e:  # ffcv raises assorted errors (KeyError, ValueError, numpy errors) on foreign files
        raise CapfastError(f"{path} is not a beton ({e.__class__.__name__}: {e})") from None
    check_fields(path, reader)
    check_size(path, reader)
    check_meta(path)
    return reader


def check_header(path: Path) -> None:
    from ffcv.types import CURRENT_VERSION, HeaderType

    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise CapfastError(f"{path} is not a beton (file too small)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    page_size, fields = int(header["page_size"]), int(header["num_fields"])
    if not (page_size > 0 and page_size & (page_size - 1) == 0 and 0 < fields < 256):
        raise CapfastError(f"{path} is not a beton (bad header)")
    if int(header["version"]) != CURRENT_VERSION:
        raise CapfastError(f"{path} was written by an incompatible ffcv version "
                           f"(file format {int(header['version'])}, this ffcv reads {CURRENT_VERSION})")
    if int(header["alloc_table_ptr"]) > size:  # its records, then its allocation table, lie past the end
        raise truncated(path, size, f"at least {int(header['alloc_table_ptr'])}")


def check_size(path: Path, reader) -> None:
    """The file ends where its allocation table does: one entry per record and paged field."""
    from ffcv.types import ALLOC_TABLE_TYPE

    size = path.stat().st_size
    expected = (int(reader.header["alloc_table_ptr"])
                + int(reader.num_samples) * len(PAGED_FIELDS) * ALLOC_TABLE_TYPE.itemsize)
    if size < expected:
        raise truncated(path, size, str(expected))
    if size > expected:
        raise CapfastError(f"{path} has {size - expected} bytes past its end ({size} bytes, its header expects "
                           f"{expected}): not a beton as capfast convert writes it")


def truncated(path: Path, size: int, expected: str) -> CapfastError:
    return CapfastError(f"{path} is truncated ({size} bytes, its header expects {expected}): copy it again")


def check_fields(path: Path, reader) -> None:
    """The fields of schema.FIELD_NAMES, or of RECORD_FIELDS (format 1, without checksums), of the right types."""
    names = list(reader.field_names)
    for name in schema.RECORD_FIELDS:
        if name not in names:
            raise CapfastError(f"{path} is not a capfast beton: missing field '{name}'")
    if names not in (list(schema.FIELD_NAMES), list(schema.RECORD_FIELDS)):
        raise CapfastError(f"{path} was {INCOMPATIBLE} (fields {names}, expected {list(schema.FIELD_NAMES)})")
    for name in names:
        actual, expected = type(reader.handlers[name]).__name__, EXPECTED_TYPES[name]
        if actual != expected:
            raise CapfastError(f"{path} was {INCOMPATIBLE} (field '{name}' is {actual}, expected {expected})")
    captions = reader.handlers[schema.CAPTIONS]
    if np.dtype(captions.dtype) != np.int32 or len(captions.shape) != 2:
        raise CapfastError(f"{path} was {INCOMPATIBLE} (captions are {np.dtype(captions.dtype)} "
                           f"{tuple(int(s) for s in captions.shape)}, expected int32 [K, max_len+2])")


def check_meta(path: Path) -> None:
    meta_path = path.parent / schema.META_FILE
    if not meta_path.exists():
        return  # a beton copied on its own is still readable
    try:
        version = json.loads(meta_path.read_text()).get("format_version")
    except (OSError, ValueError, AttributeError):
        raise CapfastError(f"{meta_path} is not valid JSON") from None
    if version not in schema.READABLE_FORMAT_VERSIONS:
        raise CapfastError(f"{path} was {INCOMPATIBLE} (format_version {version} in {meta_path}, this capfast reads "
                           f"{' and '.join(map(str, schema.READABLE_FORMAT_VERSIONS))}); convert it again")


class BetonContents:
    """Raw records of a checked capfast beton, read straight from the file (for inspection and tests)."""

    def __init__(self, path):
        self.path = Path(path)
        self.reader = check_beton(self.path)
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        fields = {name: f"f{i}" for i, name in enumerate(self.reader.field_names)}
        metadata = self.reader.metadata
        self.image_meta = metadata[fields[schema.IMAGE]]
        self.caption_ptrs = metadata[fields[schema.CAPTIONS]].astype(np.int64)
        self.ncaptions = metadata[fields[schema.NCAPTIONS]].astype(np.int64)
        self.image_ids = metadata[fields[schema.IMAGE_ID]].astype(np.int64)
        # int64 [records], or None for a format 1 beton (no checksums)
        self.checksums = metadata[fields[schema.CHECKSUM]].astype(np.int64) if schema.CHECKSUM in fields else None
        self.caption_shape = tuple(int(s) for s in self.reader.handlers[schema.CAPTIONS].shape)
        table = self.reader.alloc_table
        self.sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist()))

    def __len__(self) -> int:
        return int(self.reader.num_samples)

    @property
    def caption_nbytes(self) -> int:
        """Bytes of one record's caption rows."""
        return int(np.prod(self.caption_shape)) * 4

    def captions(self, i: int) -> np.ndarray:
        """int32 [K, max_len+2] token ids of record i."""
        return self.captions_of(np.array([i]))[0]

    def captions_of(self, indices: np.ndarray) -> np.ndarray:
        offsets = self.caption_ptrs[indices][:, None] + np.arange(self.caption_nbytes)
        return np.ascontiguousarray(self.data[offsets]).view(np.int32).reshape((len(indices),) + self.caption_shape)

    def image_bytes(self, i: int) -> bytes:
        """The stored JPEG of record i."""
        ptr = int(self.image_meta["data_ptr"][i])
        return self.data[ptr:ptr + self.sizes[ptr]].tobytes()

    def image_nbytes(self) -> np.ndarray:
        """int64 [records]: the stored JPEG size of every record, in bytes; -1 where the record's metadata points
        at no allocation (damaged)."""
        ptrs = self.image_meta["data_ptr"].astype(np.int64)
        return np.array([self.sizes.get(p, -1) for p in ptrs.tolist()], dtype=np.int64)

    def image_size(self, i: int) -> tuple[int, int]:
        return int(self.image_meta["width"][i]), int(self.image_meta["height"][i])


def caption_lengths(contents: BetonContents, vocab_pad: int = 0) -> np.ndarray:
    """Tokens per real caption (bos, eos and padding excluded), over all records."""
    lengths = []
    for start in range(0, len(contents), STATS_CHUNK):
        indices = np.arange(start, min(start + STATS_CHUNK, len(contents)))
        rows = contents.captions_of(indices)
        real = np.arange(rows.shape[1])[None, :] < contents.ncaptions[indices][:, None]
        lengths.append(((rows != vocab_pad).sum(axis=2) - 2)[real])
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"min": None, "mean": None, "max": None}
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "max": int(values.max())}


def load_vocab_beside(path: Path) -> Vocab | None:
    vocab_path = path.parent / schema.VOCAB_FILE
    return Vocab.load(vocab_path) if vocab_path.exists() else None


def check_token_ids(contents: BetonContents, vocab_size: int) -> None:
    """Every caption token id of the beton is a word of a vocabulary of `vocab_size`: a one-line CapfastError
    naming the first record with one outside it (an id past the end would index past the model's embedding)."""
    for start in range(0, len(contents), STATS_CHUNK):
        indices = np.arange(start, min(start + STATS_CHUNK, len(contents)))
        rows = contents.captions_of(indices).reshape(len(indices), -1)
        bad = np.flatnonzero(((rows < 0) | (rows >= vocab_size)).any(axis=1))
        if len(bad):
            i = int(indices[bad[0]])
            token = int(rows[bad[0]][(rows[bad[0]] < 0) | (rows[bad[0]] >= vocab_size)][0])
            raise CapfastError(f"{contents.path}: record {i} (image {int(contents.image_ids[i])}) holds token id "
                               f"{token}, outside the vocabulary of {vocab_size} words; convert it again")


def check_jpeg_markers(contents: BetonContents) -> None:
    """Every stored image starts like a JPEG (SOI) and ends like one (EOI): cheap enough for every record, and it
    finds bytes zeroed or cut short. A JPEG damaged inside is an error when it is decoded."""
    sizes = contents.image_nbytes()
    whole = sizes >= 4  # a JPEG's markers, and a pointer the allocation table knows (so inside the file)
    ptrs = np.where(whole, contents.image_meta["data_ptr"].astype(np.int64), 0)
    ends = ptrs + np.where(whole, sizes, 2)
    heads = contents.data[ptrs[:, None] + np.arange(2)]
    tails = contents.data[ends[:, None] - 2 + np.arange(2)]
    ok = (heads == JPEG_START).all(axis=1) & (tails == JPEG_END).all(axis=1) & whole
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise CapfastError(f"{contents.path}: record {i} (image {int(contents.image_ids[i])}) is not a complete "
                           f"JPEG ({int(sizes[i])} bytes without its start or end marker); convert it again")


# ---- checksums (--verify: capfast/store/verify.py) -------------------------------------------------------

def verify_beton(path) -> Verification | None:
    """verify_records of `path`; a one-line CapfastError naming the first record that fails and counting the
    others. None, with a warning, for a format 1 beton: it has no checksums, so only its structure was checked."""
    contents = BetonContents(path)
    if contents.checksums is None:
        click.echo(f"capfast: warning: {contents.path} has no record checksums (converted before capfast stored "
                   f"them): only its structure was checked, not its records; convert it again to verify them",
                   err=True)
        return None
    verification = verify_records(contents)
    if len(verification.mismatched):
        first, others = int(verification.mismatched[0]), len(verification.mismatched) - 1
        more = f"{others} more of its {len(contents)} records" if others else None
        raise mismatch_error(contents.path, first, int(contents.image_ids[first]), more)
    return verification


def data_fingerprint(path) -> dict:
    """What identifies a beton's contents cheaply: records, bytes, and a hash of its first and last MiB (the
    header, the field descriptors, the first records, the allocation table)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        digest.update(f.read(FINGERPRINT_BYTES))
    return {"records": int(check_beton(path).num_samples), "bytes": size, "sha256_ends": digest.hexdigest()}


def describe_beton(path, examples: int = 3) -> dict:
    """Summary of a capfast beton as a JSON-serializable dict (raises CapfastError if it is not one, or if a
    record holds a token id outside vocab.json or an image that is not a complete JPEG)."""
    path = Path(path)
    contents = BetonContents(path)
    vocab = load_vocab_beside(path)
    if vocab is not None:
        check_token_ids(contents, len(vocab))
    check_jpeg_markers(contents)
    k, row_len = contents.caption_shape
    shown = np.linspace(0, len(contents) - 1, num=min(examples, len(contents))).round().astype(int)
    return {
        "path": str(path),
        "records": len(contents),
        "fields": {name: type(handler).__name__ for name, handler in contents.reader.handlers.items()},
        "checksums": contents.checksums is not None,
        "captions_per_image": k,
        "max_len": row_len - 2,
        "vocab_size": len(vocab) if vocab else None,
        "captions": int(contents.ncaptions.sum()),
        "captions_per_record": stats(contents.ncaptions),
        "caption_tokens": stats(caption_lengths(contents)),
        "image_width": stats(contents.image_meta["width"].astype(np.int64)),
        "image_height": stats(contents.image_meta["height"].astype(np.int64)),
        "jpeg_bytes": stats(contents.image_nbytes()),
        "examples": [example(contents, int(i), vocab) for i in dict.fromkeys(shown.tolist())],
    }


def example(contents: BetonContents, i: int, vocab: Vocab | None) -> dict:
    rows = contents.captions(i)[:contents.ncaptions[i]]
    texts = [vocab.decode(row) if vocab else " ".join(map(str, row.tolist())) for row in rows]
    width, height = contents.image_size(i)
    return {"record": i, "image_id": int(contents.image_ids[i]), "size": [width, height], "captions": texts}


def format_text(info: dict) -> str:
    def span(s: dict) -> str:
        return f"{s['min']}..{s['max']} (mean {s['mean']})"

    lines = [
        f"{info['path']}: {info['records']} records",
        "fields: " + ", ".join(f"{n} ({t})" for n, t in info["fields"].items()),
        f"vocabulary: {info['vocab_size'] if info['vocab_size'] is not None else 'no vocab.json beside the file'}",
        f"captions: {info['captions']} ({span(info['captions_per_record'])} per record, "
        f"{info['captions_per_image']} rows of {info['max_len']} tokens + bos/eos)",
        f"tokens per caption: {span(info['caption_tokens'])}",
        f"image width: {span(info['image_width'])}, height: {span(info['image_height'])}",
        f"stored JPEG bytes: {span(info['jpeg_bytes'])}",
        "record checksums: " + ("yes (`capfast inspect --verify` checks them)" if info["checksums"] else
                                "none (converted before capfast stored them)"),
    ]
    if info.get("verified"):
        v = info["verified"]
        lines.append(f"verified: all {v['records']} records match their checksums ({v['bytes'] / 1e6:.1f} MB in "
                     f"{v['seconds']:.2f} s, {v['bytes'] / 1e6 / max(v['seconds'], 1e-9):.0f} MB/s, "
                     f"{v['threads']} threads)")
    for ex in info["examples"]:
        lines.append(f"record {ex['record']} (image {ex['image_id']}, {ex['size'][0]}x{ex['size'][1]}):")
        lines += [f"  {text}" for text in ex["captions"]]
    return "\n".join(lines)


@click.command()
@click.argument("beton", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--verify", is_flag=True,
              help="Also check every record against its checksum (reads the whole file, a thread per core); fails "
                   "naming the first record that does not match.")
def command(beton, as_json, verify):
    """Summarize FILE.beton written by `capfast convert`: records, fields, vocabulary, lengths, sizes."""
    info = describe_beton(beton)
    if verify:
        verification = verify_beton(beton)
        info["verified"] = verification.to_json() if verification else None
    click.echo(json.dumps(info) if as_json else format_text(info))
