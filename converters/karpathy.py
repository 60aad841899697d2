"""Karpathy's split file dataset_coco.json: images with filepath, filename, cocoid, split, sentences[{raw}].

Splits train and restval are merged into "train"; val and test stay. Image path = root/filepath/filename.
"""

from pathlib import Path

from capfast.common.io import read_json
from capfast.converters.common import Problem, Source, is_id, items_from_captions, require_dir
from capfast.errors import CapfastError

WHAT = "Karpathy split file"
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SPLITS = ("train", "val", "test")


def read_karpathy(dataset_json, root, splits=SPLITS) -> Source:
    """Items of the requested output splits (a subset of train, val, test)."""
    dataset_json, root = Path(dataset_json), Path(root)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise CapfastError(f"unknown Karpathy split(s) {', '.join(sorted(unknown))}; choose from train, val, test")
    data = read_json(dataset_json, WHAT)
    require_dir(root, "image root")
    rows = checked_images(data, dataset_json)
    source = Source({"format": "karpathy", "annotations": str(dataset_json), "images": str(root)})
    for split in splits:
        paths, captions, problems = split_tables(rows, split, root)
        items, uncaptioned = items_from_captions(paths, captions)
        source.items[split] = items
        source.problems[split] = problems + uncaptioned
    return source


def checked_images(data, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CapfastError(f"{WHAT} {path} is not Karpathy format (missing list 'images')")
    for n, row in enumerate(data["images"]):
        if not is_valid_row(row):
            raise CapfastError(f"{WHAT} {path}: images[{n}] lacks filepath/filename/cocoid/split/sentences "
                               "of the expected types")
        if row["split"] not in SPLIT_NAMES:
            raise CapfastError(f"{WHAT} {path}: images[{n}] has unknown split '{row['split']}'")
    return data["images"]


def is_valid_row(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("filename"), str) and isinstance(row.get("filepath", ""), str)
            and is_id(row.get("cocoid")) and isinstance(row.get("split"), str)
            and isinstance(row.get("sentences"), list)
            and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in row["sentences"]))


def split_tables(rows: list[dict], split: str, root: Path):
    paths, captions, problems = {}, {}, []
    for row in rows:
        if SPLIT_NAMES[row["split"]] != split:
            continue
        if row["cocoid"] in paths:
            problems.append(Problem("duplicate cocoid (later entry ignored)", row["cocoid"], row["filename"]))
            continue
        paths[row["cocoid"]] = root / row.get("filepath", "") / row["filename"]
        captions[row["cocoid"]] = [s["raw"] for s in row["sentences"]]
    return paths, captions, problems
