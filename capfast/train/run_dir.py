"""The run directory (`capfast train --out`): what a run writes there and what a start finds.

  checkpoints/step-N.pt  the newest `keep_last` checkpoints; older ones are removed
  last.pt, best.pt       the newest checkpoint and the best by validation CIDEr: hard links into checkpoints/
                         (a copy where the filesystem has no hard links), so a damaged or bad last.pt never
                         leaves a run without a good checkpoint
  config.json, tb/       the config in use (with every resume's changes under "history"), TensorBoard's events
  .lock                  held by the running run (capfast/common/lock.py)

Saving writes the step file atomically first and then moves the links, so a kill at any moment leaves last.pt
pointing at a complete checkpoint. Temporary files of a save that was killed are removed when the next run
starts (it holds the lock, so no other run is writing them).
"""

import os
import re
import shutil
from pathlib import Path

from capfast.errors import CapfastError
from capfast.models import checkpoint

LAST, BEST, FOLDER = "last.pt", "best.pt", "checkpoints"
STEP_FILE = re.compile(r"step-(\d+)\.pt")
TEMPORARY = re.compile(r"\..+\.[0-9a-z_]+\.tmp")  # common/io.py's atomic_path names


class RunDir:
    def __init__(self, path: Path, keep_last: int = 2):
        self.path, self.keep_last = Path(path), keep_last

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def remove_stale_temporaries(self) -> list[Path]:
        stale = [p for folder in (self.path, self.path / FOLDER) if folder.is_dir()
                 for p in folder.iterdir() if TEMPORARY.fullmatch(p.name)]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, state: dict, best: bool = False) -> Path:
        """Writes checkpoints/step-N.pt for state["step"], points last.pt (and best.pt) at it, prunes old ones."""
        folder = self.path / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"step-{state['step']:08d}.pt"
        checkpoint.save(state, target)
        for link in (self.last, self.best) if best else (self.last,):
            _point(link, target)
        self._prune()
        return target

    def checkpoints(self) -> list[Path]:
        """The step files, newest first."""
        folder = self.path / FOLDER
        found = [p for p in folder.iterdir() if STEP_FILE.fullmatch(p.name)] if folder.is_dir() else []
        return sorted(found, key=lambda p: int(STEP_FILE.fullmatch(p.name)[1]), reverse=True)

    def load_latest(self, warn) -> tuple[dict, Path]:
        """The newest checkpoint that loads (checksum, finite weights): last.pt, or else the newest step file, with
        `warn(message)` saying why last.pt was passed over."""
        try:
            return checkpoint.load(self.last), self.last
        except CapfastError as error:
            passed_over = error
        for candidate in self.checkpoints():
            if self.last.exists() and candidate.samefile(self.last):
                continue  # last.pt itself
            try:
                state = checkpoint.load(candidate)
            except CapfastError:
                continue
            warn(f"{passed_over}: resuming from {candidate} instead")
            return state, candidate
        raise passed_over

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep_last:]:
            old.unlink(missing_ok=True)  # last.pt and best.pt keep their own links to what they point at


def _point(link: Path, target: Path) -> None:
    """Atomically makes `link` the same file as `target` (a hard link; a copy where links are unsupported)."""
    tmp = link.with_name(f".{link.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
