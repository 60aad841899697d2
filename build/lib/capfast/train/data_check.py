"""Up-front checks of a converted data directory, so a bad --data fails in one line, not mid-run."""

from pathlib import Path

from capfast import schema
from capfast.errors import CapfastError
from capfast.io import read_json
from capfast.vocab import Vocab


def check_data_dir(data_dir: Path, train_split: str) -> Vocab:
    """The directory's vocabulary, after checking the train beton exists and was written with it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CapfastError(f"data directory not found: {data_dir} (make one with `capfast convert`)")
    beton = schema.beton_path(data_dir, train_split)
    if not beton.is_file():
        raise CapfastError(f"{beton} not found: convert the {train_split!r} split first")
    vocab = Vocab.load(data_dir / schema.VOCAB_FILE)
    check_vocab_matches(data_dir, train_split, vocab)
    return vocab


def check_vocab_matches(data_dir: Path, split: str, vocab: Vocab) -> None:
    """meta.json records the fingerprint of the vocabulary each split was encoded with."""
    meta = read_json(Path(data_dir) / schema.META_FILE, "meta.json of `capfast convert`")
    split_meta = meta.get("splits", {}).get(split, {})
    expected = split_meta.get("settings", {}).get("vocab_fingerprint")
    if expected and expected != vocab.fingerprint():
        raise CapfastError(f"{split}.beton was encoded with a different vocabulary than "
                           f"{data_dir / schema.VOCAB_FILE}: re-run `capfast convert` with --vocab")
