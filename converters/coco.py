"""COCO captions format: {"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}."""

from pathlib import Path

from capfast.common.io import read_json
from capfast.converters.common import Problem, Source, is_id, items_from_captions, require_dir
from capfast.errors import CapfastError

WHAT = "annotations file"


def read_coco(annotations, images, split: str) -> Source:
    annotations, images = Path(annotations), Path(images)
    data = read_json(annotations, WHAT)
    require_dir(images, "image directory")
    image_rows, caption_rows = checked_tables(data, annotations)
    paths, problems = image_paths(image_rows, images, annotations)
    captions, caption_problems = captions_by_image(caption_rows, paths, annotations)
    items, uncaptioned = items_from_captions(paths, captions)
    source = Source({"format": "coco", "annotations": str(annotations), "images": str(images)})
    source.items[split] = items
    source.problems[split] = problems + caption_problems + uncaptioned
    return source


def checked_tables(data, path: Path) -> tuple[list, list]:
    if not isinstance(data, dict):
        raise CapfastError(f"{WHAT} {path} is not COCO captions format (top level is not an object)")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise CapfastError(f"{WHAT} {path} is not COCO captions format (missing list '{key}')")
    return data["images"], data["annotations"]


def image_paths(rows: list, image_dir: Path, path: Path) -> tuple[dict[int, Path], list[Problem]]:
    paths, problems = {}, []
    for n, row in enumerate(rows):
        if not (isinstance(row, dict) and is_id(row.get("id")) and isinstance(row.get("file_name"), str)):
            raise CapfastError(f"{WHAT} {path}: images[{n}] lacks an integer 'id' or a string 'file_name'")
        if row["id"] in paths:
            problems.append(Problem("duplicate image id (later entry ignored)", row["id"], row["file_name"]))
            continue
        paths[row["id"]] = image_dir / row["file_name"]
    return paths, problems


def captions_by_image(rows: list, paths: dict[int, Path], path: Path) -> tuple[dict[int, list[str]], list[Problem]]:
    captions, problems = {}, []
    for n, row in enumerate(rows):
        if not (isinstance(row, dict) and is_id(row.get("image_id")) and isinstance(row.get("caption"), str)):
            raise CapfastError(f"{WHAT} {path}: annotations[{n}] lacks an integer 'image_id' or a string 'caption'")
        if row["image_id"] not in paths:
            problems.append(Problem(f"annotation {row.get('id', n)} refers to unknown image id", row["image_id"]))
            continue
        captions.setdefault(row["image_id"], []).append(row["caption"])
    return captions, problems
