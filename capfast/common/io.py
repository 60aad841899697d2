"""Atomic, durable file writes: a crash never leaves a half-written output behind, and a rename that returned
survives a power cut (the file is fsynced before it, its directory after)."""

import contextlib
import json
import os
import secrets
import tempfile
from pathlib import Path

from capfast.errors import CapfastError


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yields a temporary path beside `final`; renames it onto `final` only if the block succeeds. `final` gets the
    usual permissions (0666 less the umask) whatever made the temporary file: mkstemp makes 0600 files, and so does
    safetensors' save, which writes a file of its own and renames it onto the path it is given."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_path(path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Creates `path` if needed and proves it writable by writing a file there (permissions alone do not show a
    read-only filesystem, nor anything to root); a one-line CapfastError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapfastError(f"cannot create {what} {path}: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CapfastError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def atomic_file(final: Path):
    """Yields a new binary file (read/write, seekable) that becomes `final` only if the block succeeds. On Linux
    it has no name until then (O_TMPFILE), so not even kill -9 leaves a partial file behind; elsewhere it is a
    hidden temporary file beside `final` (atomic_path)."""
    final = Path(final)
    fd = _unnamed_file_in(final.parent)
    if fd is None:
        with atomic_path(final) as tmp, open(tmp, "w+b") as file:
            yield file
        return
    with open(fd, "w+b") as file:
        yield file
        file.flush()
        _link_into_place(fd, final)


def _unnamed_file_in(directory: Path) -> int | None:
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666)  # the umask applies as usual
    except OSError:  # a filesystem without O_TMPFILE (EOPNOTSUPP, EISDIR on old kernels): use a named file
        return None


def _link_into_place(fd: int, final: Path) -> None:
    """Gives the unnamed file a temporary name beside `final`, then renames it onto `final` (which, unlike
    linking, may replace an existing file)."""
    tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
    proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:  # linkat(AT_SYMLINK_FOLLOW); os.link uses it only when given a directory fd
        os.link(str(fd), tmp, src_dir_fd=proc_fds, follow_symlinks=True)
    finally:
        os.close(proc_fds)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
