"""An image folder plus a captions JSONL file, one object per line:
    {"file": "x.jpg", "captions": ["...", ...]}   or   {"file": "x.jpg", "caption": "..."}
with an optional integer "image_id" (default: the line's index among non-blank lines). Several lines may
name the same file; their captions are merged.
"""

import json
from pathlib import Path

from capfast.converters.common import Problem, Source, is_id, items_from_captions, require_dir
from capfast.errors import CapfastError

WHAT = "captions file"


def read_folder(image_dir, captions_jsonl, split: str) -> Source:
    image_dir, captions_jsonl = Path(image_dir), Path(captions_jsonl)
    lines = read_lines(captions_jsonl)
    require_dir(image_dir, "image directory")
    paths, captions, problems = {}, {}, []
    ids_by_file = {}
    for index, (lineno, row) in enumerate(parsed_rows(lines, captions_jsonl)):
        file_name, texts = row["file"], row_captions(row, lineno, captions_jsonl)
        image_id = row.get("image_id", ids_by_file.get(file_name, index))
        if image_id in paths and paths[image_id] != image_dir / file_name:
            problems.append(Problem(f"line {lineno}: image id already used by {paths[image_id].name}", image_id,
                                    file_name))
            continue
        ids_by_file.setdefault(file_name, image_id)
        paths[image_id] = image_dir / file_name
        captions.setdefault(image_id, []).extend(texts)
    items, uncaptioned = items_from_captions(paths, captions)
    source = Source({"format": "folder", "annotations": str(captions_jsonl), "images": str(image_dir)})
    source.items[split] = items
    source.problems[split] = problems + uncaptioned
    return source


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CapfastError(f"{WHAT} not found: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CapfastError(f"cannot read {WHAT} {path}: {getattr(e, 'strerror', None) or e}") from None


def parsed_rows(lines: list[str], path: Path):
    """(1-based line number, object) for each non-blank line, validating the schema."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CapfastError(f"{WHAT} {path} line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise CapfastError(f"{WHAT} {path} line {lineno}: expected an object with a string 'file'")
        if "image_id" in row and not is_id(row["image_id"]):
            raise CapfastError(f"{WHAT} {path} line {lineno}: 'image_id' must be an integer")
        yield lineno, row


def row_captions(row: dict, lineno: int, path: Path) -> list[str]:
    texts = row.get("captions", [row["caption"]] if "caption" in row else None)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise CapfastError(f"{WHAT} {path} line {lineno}: expected 'captions' (list of strings) or 'caption' (string)")
    return texts
