"""Atomic file writes: a crash never leaves a half-written output behind."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

from capfast.errors import CapfastError


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yields a temporary path beside `final`; renames it onto `final` only if the block succeeds."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path, what: str):
    """Parsed JSON of `path`; a CapfastError naming `what` and the file when it is missing or invalid."""
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
