"""`capfast convert`: COCO / Karpathy / folder+JSONL captions -> OUT/NAME.beton + refs + vocab.json + meta.json.

The output layout is defined in capfast/store/schema.py. One pass per split: worker processes turn each item into its
stored values (capfast/pack/records.py: captions tokenized and encoded; the image decoded, validated, normalized,
resized and JPEG-encoded; the record's checksum), and this process appends them, in image-id order, to a beton that
becomes visible only when complete (capfast/pack/beton_writer.py, capfast/common/io.py). So the output bytes do not
depend on --workers, bad items never reach the beton, and nothing but the beton itself is written. A lock on OUT
(capfast/common/lock.py) refuses a second convert into it while one runs. Captions cut to --max-len are counted,
with the length that would keep 99 % of them whole.
"""

import collections
import json
import os
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from capfast.common import options
from capfast.common.io import atomic_file, atomic_write_text, ensure_writable_dir
from capfast.common.lock import RunLock
from capfast.common.options import option
from capfast.common.progress import track
from capfast.common.runtime import prepare_process
from capfast.converters import Item, Problem, Source, read_coco, read_folder, read_karpathy
from capfast.errors import CapfastError
from capfast.pack.beton_writer import BetonWriter, jpeg_field_class, page_size_for
from capfast.pack.pool import ordered_map
from capfast.pack.records import Record, RecordSettings, count_words, encode_item, init_worker, warm_up
from capfast.store import schema
from capfast.store.vocab import Vocab

TRAIN = "train"
SHOWN_PROBLEMS = 5
CAPTIONS_PER_COUNT_JOB = 256
WHOLE_CAPTIONS_PERCENT = 99  # the max_len suggested when captions are cut keeps this share of them whole


@dataclass(frozen=True)
class Settings:
    """How the records of a split are made: the defaults and valid values of convert's options (errors name the
    command-line flag)."""

    image_size: int = option(256, min=8, max=4096)  # square side, or the longest side with keep_aspect
    keep_aspect: bool = option(False)
    quality: int = option(90, min=1, max=100)  # JPEG quality in the beton
    max_len: int = option(16, min=1, max=1000)  # tokens kept per caption row
    captions_per_image: int = option(5, min=1, max=100)  # caption rows per record; the rest stay in refs only
    min_count: int = option(5, min=1)  # vocabulary: a word seen fewer times in train is <unk>


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def convert(out, split: str | None = None, *, annotations=None, images=None, karpathy=None, folder=None,
            captions=None, vocab=None, workers: int | None = None, overwrite: bool = False, progress: bool = True,
            **settings) -> dict:
    """Converts one input (COCO: annotations+images; Karpathy: karpathy+images; folder: folder+captions) and
    returns {split: meta entry}. `split` may be a comma-separated list in Karpathy mode (default train,val,test).
    `settings`: the fields of Settings (image_size=..., min_count=...)."""
    prepare_process()  # before ffcv's import below, and before worker processes are forked
    settings = options.build(Settings, settings, flags=True, unknown_key=lambda key: f"unknown setting {key!r}")
    workers = workers or default_workers()
    source = read_source(split, annotations, images, karpathy, folder, captions)
    warm_up()  # before any worker process is forked
    out = ensure_writable_dir(Path(out))
    with RunLock(out):  # before anything in OUT is read: two converts into it would each write, the last one winning
        return convert_splits(out, source, vocab, settings, workers, overwrite, progress, karpathy is not None)


def convert_splits(out: Path, source: Source, vocab_file, settings: Settings, workers: int, overwrite: bool,
                   progress: bool, karpathy_mode: bool) -> dict:
    for name in source.items:
        if schema.beton_path(out, name).exists() and not overwrite:
            raise CapfastError(f"{schema.beton_path(out, name)} already exists (pass --overwrite to replace it)")
    words, vocab_is_new = resolve_vocab(out, source, vocab_file, settings.min_count, karpathy_mode, workers)
    import ffcv.fields  # noqa: F401  (seconds of numba compilation; paid before the per-split timing starts)

    results = {}
    for name, items in source.items.items():
        results[name] = convert_split(out, name, items, source, words, settings, workers, progress)
        if vocab_is_new:  # saved only once a split that uses it exists
            words.save(out / schema.VOCAB_FILE)
            vocab_is_new = False
        update_meta(out, name, results[name])
    return results


def read_source(split, annotations, images, karpathy, folder, captions) -> Source:
    given = [flag for flag, value in (("--annotations", annotations), ("--karpathy", karpathy),
                                      ("--folder", folder)) if value is not None]
    if len(given) != 1:
        raise CapfastError("give exactly one input: --annotations (COCO), --karpathy or --folder")
    if karpathy is not None:
        require(images, "--karpathy needs --images (the root of the images the split file names: COCO's, or the Flickr "
                          "image folder)")
        if split:
            return read_karpathy(karpathy, images, [check_split_name(s.strip()) for s in split.split(",")])
        return without_empty_splits(read_karpathy(karpathy, images))
    require(split, "--split is required with --annotations or --folder")
    if annotations is not None:
        require(images, "--annotations needs --images (the folder holding its images)")
        return read_coco(annotations, images, check_split_name(split))
    require(captions, "--folder needs --captions (a JSONL file of {\"file\", \"captions\"} lines)")
    return read_folder(folder, captions, check_split_name(split))


def without_empty_splits(source: Source) -> Source:
    """By default Karpathy mode converts train, val and test, but only those the file actually has."""
    for name in [n for n, items in source.items.items() if not items and not source.problems[n]]:
        click.echo(f"capfast: note: {source.description['annotations']} has no '{name}' images; skipping it",
                   err=True)
        del source.items[name], source.problems[name]
    return source


def require(value, message: str) -> None:
    if value is None:
        raise CapfastError(message)


def check_split_name(name: str) -> str:
    problem = schema.split_name_problem(name)
    if problem:
        raise CapfastError(f"--split must be {problem}, got {name!r}")
    return name


# ---- vocabulary -------------------------------------------------------------------------------------------

def resolve_vocab(out: Path, source: Source, vocab_file, min_count: int, karpathy_mode: bool,
                  workers: int) -> tuple[Vocab, bool]:
    """(vocabulary, whether OUT/vocab.json must be written): --vocab FILE; else OUT/vocab.json for non-train
    splits; else built from the train split's tokenized captions."""
    saved = out / schema.VOCAB_FILE
    if vocab_file is not None:
        vocab = Vocab.load(vocab_file)
        if saved.exists() and Vocab.load(saved).fingerprint() != vocab.fingerprint():
            raise CapfastError(f"{saved} differs from --vocab {vocab_file}; use a fresh --out or the same vocabulary")
        return vocab, not saved.exists()
    if TRAIN not in source.items and saved.exists():
        return Vocab.load(saved), False
    if TRAIN not in source.items and not karpathy_mode:
        raise CapfastError(f"no vocabulary for split(s) {', '.join(source.items)}: "
                           "convert the train split first or pass --vocab")
    train_items = source.items[TRAIN] if TRAIN in source.items else train_items_for_vocab(source)
    vocab = Vocab.from_counts(word_counts([c for item in train_items for c in item.captions], workers), min_count)
    warn_if_vocab_changes(out, vocab, set(source.items))
    return vocab, True


def word_counts(captions: list[str], workers: int) -> collections.Counter:
    """Token counts over all captions, tokenized by the worker processes."""
    jobs = [captions[i:i + CAPTIONS_PER_COUNT_JOB] for i in range(0, len(captions), CAPTIONS_PER_COUNT_JOB)]
    total = collections.Counter()
    for counts in ordered_map(count_words, jobs, workers, chunk_size=1):
        total.update(counts)
    return total


def train_items_for_vocab(source: Source) -> list[Item]:
    """Karpathy mode converting only val/test: re-read the file's train split to build the vocabulary."""
    train = read_karpathy(source.description["annotations"], source.description["images"], [TRAIN])
    if not train.items[TRAIN]:
        raise CapfastError(f"{source.description['annotations']} has no train images to build a vocabulary from")
    return train.items[TRAIN]


def warn_if_vocab_changes(out: Path, vocab: Vocab, converting: set[str]) -> None:
    for name, entry in read_meta(out).get("splits", {}).items():
        old = entry.get("settings", {}).get("vocab_fingerprint")
        if old and old != vocab.fingerprint() and name not in converting:
            click.echo(f"capfast: warning: split '{name}' was converted with another vocabulary; convert it again",
                       err=True)


# ---- one split --------------------------------------------------------------------------------------------

def convert_split(out: Path, name: str, items: list[Item], source: Source, vocab: Vocab, settings: Settings,
                  workers: int, progress: bool) -> dict:
    started = time.perf_counter()
    problems = list(source.problems.get(name, []))
    written = write_split_beton(schema.beton_path(out, name), items, vocab, settings, workers, progress, problems)
    refs = {str(item.image_id): item.captions for item in written.items}
    atomic_write_text(schema.refs_path(out, name), json.dumps(refs, ensure_ascii=False))
    copy_attributes(out, name, source, refs)
    elapsed = time.perf_counter() - started
    report(name, out, len(refs), problems, elapsed)
    note_cut_captions(name, written, settings.max_len)
    return split_meta(source, settings, vocab, refs, written.captions, written.cut(settings.max_len), problems,
                      elapsed)


@dataclass
class Written:
    items: list[Item] = field(default_factory=list)  # in the beton, in its order
    lengths: collections.Counter = field(default_factory=collections.Counter)  # stored captions by tokens, uncut

    @property
    def captions(self) -> int:
        """Caption rows stored."""
        return sum(self.lengths.values())

    def cut(self, max_len: int) -> int:
        """Stored captions longer than max_len tokens: the beton holds their first max_len."""
        return sum(count for length, count in self.lengths.items() if length > max_len)

    def length_keeping(self, percent: int) -> int:
        """The smallest max_len that would store `percent` % of the captions whole."""
        kept = 0
        for length in sorted(self.lengths):
            kept += self.lengths[length]
            if kept * 100 >= percent * self.captions:
                return length
        return 0


def write_split_beton(beton: Path, items: list[Item], vocab: Vocab, settings: Settings, workers: int,
                      progress: bool, problems: list[Problem]) -> Written:
    """One pass: the workers' records are appended in item order; skipped items are added to `problems`."""
    record_settings = RecordSettings(settings.image_size, settings.keep_aspect, settings.quality,
                                     settings.captions_per_image, settings.max_len)
    jobs = [(str(item.path), item.captions, item.image_id) for item in items]
    written = Written()
    try:
        with (closing(ordered_map(encode_item, jobs, workers, init_worker, (record_settings, vocab))) as records,
              atomic_file(beton) as file):
            writer = beton_writer(file, settings, len(items))
            for item, record in track(zip(items, records), len(items), f"convert {beton.stem}", "img",
                                      enabled=progress):
                if isinstance(record, Record):
                    writer.append(record.values())
                    written.items.append(item)
                    written.lengths.update(record.lengths)
                else:
                    problems.append(Problem(record, item.image_id, item.path.name))
            if not written.items:
                raise CapfastError(f"split '{beton.stem}': no valid images to write ({len(problems)} skipped; "
                                   f"first: {problems[0].reason if problems else 'no items in the input'})")
            writer.finish()
    except OSError as e:  # a full disk, most likely
        raise CapfastError(f"cannot write {beton}: {e.strerror or e}") from None
    return written


def beton_writer(file, settings: Settings, capacity: int) -> BetonWriter:
    """The image field takes the JPEG bytes the workers encoded. A page holds at least one record with twice
    the raw image size (a JPEG of noise at high quality can exceed it)."""
    fields = {**schema.beton_fields(settings.captions_per_image, settings.max_len),
              schema.IMAGE: jpeg_field_class()()}
    largest = 2 * 3 * settings.image_size ** 2 + 4 * settings.captions_per_image * (settings.max_len + 2)
    return BetonWriter(file, fields, capacity, page_size_for(largest, capacity))


def report(name: str, out: Path, written: int, problems: list[Problem], elapsed: float) -> None:
    if problems:
        click.echo(f"capfast: split '{name}': skipped {len(problems)} item(s) (all listed in "
                   f"{out / schema.META_FILE}):", err=True)
        for problem in problems[:SHOWN_PROBLEMS]:
            click.echo(f"  {describe(problem)}", err=True)
    click.echo(f"{name}: wrote {written} images to {schema.beton_path(out, name)} in {elapsed:.1f} s "
               f"({written / max(elapsed, 1e-9):.0f} img/s)", err=True)


def note_cut_captions(name: str, written: Written, max_len: int) -> None:
    cut = written.cut(max_len)
    if not cut:
        return
    keeping = written.length_keeping(WHOLE_CAPTIONS_PERCENT)
    hint = f"; --max-len {keeping} keeps {WHOLE_CAPTIONS_PERCENT} % whole" if keeping > max_len else ""
    click.echo(f"capfast: note: split '{name}': {cut} of {written.captions} captions "
               f"({100 * cut / written.captions:.1f} %) are longer than --max-len {max_len} tokens and were cut "
               f"to it in the beton (refs keep them whole){hint}", err=True)


def describe(problem: Problem) -> str:
    where = " ".join(p for p in (f"image {problem.image_id}" if problem.image_id is not None else "",
                                 problem.file or "") if p)
    return f"{where}: {problem.reason}" if where else problem.reason


def copy_attributes(out: Path, name: str, source: Source, refs: dict) -> None:
    """`capfast synth` records what each image shows beside its COCO captions file (captions_X.json ->
    attributes_X.json); the written images' entries go to OUT/attributes_NAME.json for `capfast eval`."""
    from capfast.common.io import read_json

    target = schema.attributes_path(out, name)
    annotations = Path(source.description.get("annotations", ""))
    found = annotations.with_name("attributes_" + annotations.name.removeprefix("captions_"))
    if source.description.get("format") != "coco" or not annotations.name.startswith("captions_") \
            or not found.is_file():
        target.unlink(missing_ok=True)  # from an earlier conversion of this split
        return
    attributes = read_json(found, "image attributes (written by `capfast synth`)")
    kept = {image_id: attributes[image_id] for image_id in refs if image_id in attributes}
    atomic_write_text(target, json.dumps(kept))


# ---- meta.json --------------------------------------------------------------------------------------------

def split_meta(source: Source, settings: Settings, vocab: Vocab, refs: dict, beton_captions: int, truncated: int,
               problems: list[Problem], elapsed: float) -> dict:
    return {
        "source": source.description,
        "settings": {**asdict(settings), "vocab_fingerprint": vocab.fingerprint(), "vocab_size": len(vocab)},
        "counts": {"images": len(refs), "captions": sum(map(len, refs.values())),
                   "captions_in_beton": beton_captions, "truncated_captions": truncated, "skipped": len(problems)},
        "skipped": [p.to_json() for p in problems],
        "seconds": round(elapsed, 3),
    }


def read_meta(out: Path) -> dict:
    path = out / schema.META_FILE
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CapfastError(f"{path} is not valid JSON; remove it and convert all splits again") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in schema.READABLE_FORMAT_VERSIONS:
        return {}  # an older layout: its splits must be converted again anyway
    return meta


def update_meta(out: Path, name: str, entry: dict) -> None:
    meta = read_meta(out)
    splits = {**meta.get("splits", {}), name: entry}
    merged = {"format_version": schema.FORMAT_VERSION, "splits": dict(sorted(splits.items()))}
    atomic_write_text(out / schema.META_FILE, json.dumps(merged, indent=1, ensure_ascii=False))


# ---- CLI --------------------------------------------------------------------------------------------------

def setting(name: str, help_text: str):
    """The command-line option of Settings.NAME, with its default; options.build checks its value."""
    value = options.default(Settings, name)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return click.option(flag, name, is_flag=True, help=help_text)
    return click.option(flag, name, type=int, default=value, show_default=True, help=help_text)


@click.command()
@click.option("--annotations", type=click.Path(path_type=Path), help="COCO captions JSON (needs --images).")
@click.option("--images", type=click.Path(path_type=Path),
              help="Image folder (COCO), or the root of the Karpathy split file's images.")
@click.option("--karpathy", type=click.Path(path_type=Path),
              help="Karpathy split file: dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json "
                   "(needs --images).")
@click.option("--folder", type=click.Path(path_type=Path), help="Image folder described by --captions.")
@click.option("--captions", type=click.Path(path_type=Path),
              help='JSONL: {"file": "x.jpg", "captions": [...]} or "caption": "..." per line.')
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output data directory.")
@click.option("--split", help="Split name (required for COCO/folder; Karpathy: subset of train,val,test).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/SPLIT.beton.")
@click.option("--vocab", type=click.Path(path_type=Path), help="Reuse this vocab.json instead of building one.")
@setting("min_count", "Vocabulary: min word count in train.")
@setting("max_len", "Tokens kept per caption (truncate).")
@setting("captions_per_image", "Caption rows per record; extras stay in refs only.")
@setting("image_size", "Square side, or longest side.")
@setting("keep_aspect", "Keep aspect ratio: longest side = --image-size.")
@setting("quality", "JPEG quality in the beton.")
def command(annotations, images, karpathy, folder, captions, out, split, workers, overwrite, vocab, **settings):
    """Pack images and tokenized captions into OUT/SPLIT.beton (+ refs_SPLIT.json, vocab.json, meta.json)."""
    convert(out, split, annotations=annotations, images=images, karpathy=karpathy, folder=folder,
            captions=captions, vocab=vocab, workers=workers, overwrite=overwrite, progress=True, **settings)
