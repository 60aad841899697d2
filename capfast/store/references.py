"""The raw reference captions of a split (refs_SPLIT.json, written by `capfast convert`): what metrics and the
SCST reward compare generated captions with."""

from pathlib import Path

from capfast.common.io import read_json
from capfast.errors import CapfastError
from capfast.store import schema


def require_references(data_dir: Path, split: str, purpose: str) -> Path:
    """refs_SPLIT.json of `data_dir`, or a one-line error saying what (`purpose`) needs it."""
    refs_file = schema.refs_path(data_dir, split)
    if not refs_file.is_file():
        raise CapfastError(f"{purpose} needs the {split} split's reference captions: {refs_file} not found "
                           f"(`capfast convert` writes it beside {split}.beton)")
    return refs_file


def load_references(refs_file: Path) -> dict[int, list[str]]:
    """{image id: [caption, ...]}, untruncated and untokenized, as the source dataset had them."""
    raw = read_json(refs_file, "reference captions (written by `capfast convert`)")
    return {int(k): v for k, v in raw.items()}
