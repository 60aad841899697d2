"""The raw reference captions of a split (refs_SPLIT.json, written by `capfast convert`): what metrics and the
SCST reward compare generated captions with."""

from pathlib import Path

from capfast.common.io import read_json


def load_references(refs_file: Path) -> dict[int, list[str]]:
    """{image id: [caption, ...]}, untruncated and untokenized, as the source dataset had them."""
    raw = read_json(refs_file, "reference captions (written by `capfast convert`)")
    return {int(k): v for k, v in raw.items()}
