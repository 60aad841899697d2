"""One run per directory: an exclusive flock on DIR/.lock, held while the run lives.

The kernel drops a flock when its holder dies, kill -9 included, so a crashed run never leaves a stale lock
(a restart by torchrun or a scheduler takes it over); the file says who holds it, for the error message of a
second run.
"""

import fcntl
import json
import os
import socket
from pathlib import Path

from capfast.errors import CapfastError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise CapfastError(f"{self.path.parent} is in use by {holder}: wait for that run to end, stop it, "
                               f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another run"
    return f"pid {holder['pid']} on {holder.get('host', 'an unknown host')}"
