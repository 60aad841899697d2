"""Readers for caption dataset formats. Each returns a `Source`: per split, the items to convert (sorted by
image id) and the problems found in the annotations (items skipped, with reasons).

    read_coco(annotations_json, image_dir, split)        COCO captions JSON + its image folder
    read_karpathy(dataset_coco_json, coco_root, splits)  Karpathy's dataset_coco.json (restval joins train)
    read_folder(image_dir, captions_jsonl, split)        a folder + JSONL lines {"file", "captions"|"caption"}

Bad input (missing, unreadable, invalid JSON, wrong schema, missing image folder) raises CapfastError.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from capfast.errors import CapfastError


@dataclass(frozen=True)
class Item:
    image_id: int
    path: Path
    captions: list[str]


@dataclass(frozen=True)
class Problem:
    """Something skipped before any image is opened, e.g. an annotation for an unknown image id."""

    reason: str
    image_id: int | None = None
    file: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in (("image_id", self.image_id), ("file", self.file), ("reason", self.reason))
                if v is not None}


@dataclass
class Source:
    description: dict  # for meta.json: the format and input paths
    items: dict[str, list[Item]] = field(default_factory=dict)
    problems: dict[str, list[Problem]] = field(default_factory=dict)


def load_json_file(path: Path, what: str):
    path = Path(path)
    if not path.exists():
        raise CapfastError(f"{what} not found: {path}")
    if not path.is_file():
        raise CapfastError(f"{what} is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CapfastError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CapfastError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CapfastError(f"{what} not found or not a directory: {path}")
    return path


def items_from_captions(paths: dict[int, Path], captions: dict[int, list[str]]) -> tuple[list[Item], list[Problem]]:
    """Joins image paths and captions by image id; images without any caption become problems."""
    items, problems = [], []
    for image_id in sorted(paths):
        texts = [c for c in captions.get(image_id, []) if c.strip()]
        if texts:
            items.append(Item(image_id, paths[image_id], texts))
        else:
            problems.append(Problem("image has no captions", image_id, paths[image_id].name))
    return items, problems


from converters.coco import read_coco  # noqa: E402  (the readers import the helpers above)
from converters.folder import read_folder  # noqa: E402
from converters.karpathy import read_karpathy  # noqa: E402

__all__ = ["Item", "Problem", "Source", "read_coco", "read_karpathy", "read_folder"]
