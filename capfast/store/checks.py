"""Up-front checks of a converted data directory, so that a bad --data fails in one line, not mid-run; and the
one vocabulary check every reader of token ids makes (data, checkpoints, init_from, resume)."""

from pathlib import Path

from capfast.common.io import read_json
from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.vocab import Vocab


def require_split(data_dir: Path, split: str) -> Path:
    """The split's beton in `data_dir`, which must exist."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise CapfastError(f"--data takes the directory written by `capfast convert`, not a file "
                           f"(for this one: --data {data_dir.parent} --split {data_dir.stem})")
    if not data_dir.is_dir():
        raise CapfastError(f"data directory not found: {data_dir} (make one with `capfast convert`)")
    beton = schema.beton_path(data_dir, split)
    if not beton.is_file():
        converted = sorted(p.stem for p in data_dir.glob("*.beton"))
        raise CapfastError(f"{beton} not found: convert the {split!r} split first "
                           f"(this directory holds: {', '.join(converted) or 'no splits'})")
    return beton


def check_data_dir(data_dir: Path, split: str) -> Vocab:
    """The directory's vocabulary, after checking that the split's beton exists and was written with it."""
    require_split(data_dir, split)
    vocab = Vocab.load(Path(data_dir) / schema.VOCAB_FILE)
    check_split_vocab(data_dir, split, vocab)
    return vocab


def check_split_vocab(data_dir: Path, split: str, vocab: Vocab, what: str | None = None) -> None:
    """`vocab` is the one the split was encoded with: meta.json records its fingerprint. For a checkpoint's
    vocabulary (`what` names the checkpoint) the directory also need not hold vocab.json or meta.json (betons
    copied on their own), but where it does they must agree."""
    data_dir = Path(data_dir)
    vocab_file, meta_file = data_dir / schema.VOCAB_FILE, data_dir / schema.META_FILE
    if what is not None:
        if vocab_file.exists():
            check_same_vocabulary(what, vocab, vocab_file, Vocab.load(vocab_file).fingerprint())
        if not meta_file.exists():
            return
    meta = read_json(meta_file, "meta.json of `capfast convert`")
    recorded = meta.get("splits", {}).get(split, {}).get("settings", {}).get("vocab_fingerprint")
    if recorded:
        check_same_vocabulary(what or vocab_file, vocab, schema.beton_path(data_dir, split), recorded)


def check_same_vocabulary(what, vocab: Vocab, other, other_fingerprint: str) -> None:
    """Token ids mean words only under the vocabulary they were made with: `what` (its vocabulary `vocab`) and
    `other` must share one."""
    if vocab.fingerprint() != other_fingerprint:
        raise CapfastError(f"{what} and {other} have a different vocabulary (fingerprints {vocab.fingerprint()} "
                           f"and {other_fingerprint}): token ids would mean other words; use the data and "
                           f"checkpoints of one vocabulary (`capfast convert --vocab FILE` reuses one)")
