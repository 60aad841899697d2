"""Karpathy's split files: images with filename, split, sentences[{raw}] and an image id.

Two layouts: dataset_coco.json (cocoid is the image id, path = root/filepath/filename) and
dataset_flickr8k.json / dataset_flickr30k.json (no cocoid and no filepath: imgid is the image id,
path = root/filename). Splits train and restval are merged into "train"; val and test stay.
"""

from pathlib import Path

from capfast.common.io import read_json
from capfast.converters.common import Problem, Source, is_id, items_from_captions, require_dir
from capfast.errors import CapfastError

WHAT = "Karpathy split file"
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SPLITS = ("train", "val", "test")
ID_KEYS = {"coco": "cocoid", "flickr": "imgid"}
MARKS = {"coco": "has a cocoid (COCO layout)", "flickr": "has an imgid and no cocoid (Flickr layout)"}
FIELDS = {"coco": "filepath/filename/cocoid/split/sentences", "flickr": "filename/imgid/split/sentences"}


def read_karpathy(dataset_json, root, splits=SPLITS) -> Source:
    """Items of the requested output splits (a subset of train, val, test)."""
    dataset_json, root = Path(dataset_json), Path(root)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise CapfastError(f"unknown Karpathy split(s) {', '.join(sorted(unknown))}; choose from train, val, test")
    data = read_json(dataset_json, WHAT)
    require_dir(root, "image root")
    rows, layout = checked_images(data, dataset_json)
    source = Source({"format": "karpathy", "layout": layout, "annotations": str(dataset_json), "images": str(root)})
    for split in splits:
        paths, captions, problems = split_tables(rows, split, root, ID_KEYS[layout])
        items, uncaptioned = items_from_captions(paths, captions)
        source.items[split] = items
        source.problems[split] = problems + uncaptioned
    return source


def checked_images(data, path: Path) -> tuple[list[dict], str]:
    """The image rows and their layout (coco or flickr), which images[0] decides for the whole file."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CapfastError(f"{WHAT} {path} is not Karpathy format (missing list 'images')")
    rows = data["images"]
    layout = file_layout(rows)
    for n, row in enumerate(rows):
        if row_layout(row) not in (layout, None):
            raise CapfastError(f"{WHAT} {path}: images[{n}] {MARKS[row_layout(row)]} but images[0] {MARKS[layout]}; "
                               "use one layout per file")
        if not is_valid_row(row, ID_KEYS[layout]):
            raise CapfastError(f"{WHAT} {path}: images[{n}] lacks {FIELDS[layout]} of the expected types")
        if row["split"] not in SPLIT_NAMES:
            raise CapfastError(f"{WHAT} {path}: images[{n}] has unknown split '{row['split']}'")
    return rows, layout


def file_layout(rows: list) -> str:
    # A first image without either id is read as COCO, so such files keep the message they always got.
    return (row_layout(rows[0]) if rows else None) or "coco"


def row_layout(row) -> str | None:
    """coco if the row has a cocoid (COCO rows carry an imgid too), flickr if only an imgid, else None."""
    if not isinstance(row, dict):
        return None
    if "cocoid" in row:
        return "coco"
    return "flickr" if "imgid" in row else None


def is_valid_row(row, id_key: str) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("filename"), str) and isinstance(row.get("filepath", ""), str)
            and is_id(row.get(id_key)) and isinstance(row.get("split"), str)
            and isinstance(row.get("sentences"), list)
            and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in row["sentences"]))


def split_tables(rows: list[dict], split: str, root: Path, id_key: str):
    paths, captions, problems = {}, {}, []
    for row in rows:
        if SPLIT_NAMES[row["split"]] != split:
            continue
        image_id = row[id_key]
        if image_id in paths:
            problems.append(Problem(f"duplicate {id_key} (later entry ignored)", image_id, row["filename"]))
            continue
        paths[image_id] = root / row.get("filepath", "") / row["filename"]
        captions[image_id] = [s["raw"] for s in row["sentences"]]
    return paths, captions, problems
