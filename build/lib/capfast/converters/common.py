"""Shared by the readers: the record types and the input-file checks."""

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


def is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
