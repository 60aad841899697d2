"""The run directory (`capfast train --out`): what a run writes there and what a start finds.

  checkpoints/step-N.pt  the newest `keep_last` checkpoints, one per step saved; older ones are removed
  last.pt, best.pt       the newest checkpoint and the best by validation CIDEr: hard links into checkpoints/
                         (a copy where the filesystem has no hard links), so a damaged or bad last.pt never
                         leaves a run without a good checkpoint
  validations.json       every validation's step, epoch and metrics: the best, and how many came after it
                         (eval.patience), are read from here
  config.json, tb/       the config in use (with every resume's changes under "history"), TensorBoard's events
  .lock                  held by the running run (capfast/common/lock.py)

Saving writes the step file atomically first and then moves the links, so a kill at any moment leaves last.pt
pointing at a complete checkpoint. A validation follows the save of its step and only adds to validations.json
and moves best.pt: no checkpoint is written twice. Temporary files of a save that was killed are removed when
the next run starts (it holds the lock, so no other run is writing them).
"""

import json
import math
import os
import re
import shutil
from pathlib import Path

from capfast.common.io import atomic_write_text, read_json
from capfast.errors import CapfastError
from capfast.models import checkpoint

LAST, BEST, FOLDER, VALIDATIONS = "last.pt", "best.pt", "checkpoints", "validations.json"
STEP_FILE = re.compile(r"step-(\d+)\.pt")
TEMPORARY = re.compile(r"\..+\.[0-9a-z_]+\.tmp")  # common/io.py's atomic_path names


class ValidationLog:
    """Validations in the order they ran: [{"step", "epoch", "metrics"}]. The best is the first with the highest
    CIDEr."""

    def __init__(self, entries: list[dict] = ()):
        self.entries = list(entries)

    def add(self, step: int, epoch: int, metrics: dict) -> None:
        self.entries.append({"step": step, "epoch": epoch, "metrics": dict(metrics)})

    def until(self, step: int) -> "ValidationLog":
        """The validations of steps up to `step`: what a run resumed at `step` has behind it."""
        return ValidationLog([e for e in self.entries if e["step"] <= step])

    def at(self, step: int) -> dict | None:
        return next((e for e in self.entries if e["step"] == step), None)

    def best(self) -> dict | None:
        best = None
        for entry in self.entries:
            if best is None or _cider(entry) > _cider(best):
                best = entry
        return best

    def stale(self) -> int:
        """Validations after the best (eval.patience counts them)."""
        best = self.best()
        return 0 if best is None else len(self.entries) - 1 - self.entries.index(best)


def _cider(entry: dict) -> float:
    return entry["metrics"].get("CIDEr", -math.inf)


class RunDir:
    def __init__(self, path: Path, keep_last: int = 2):
        self.path, self.keep_last = Path(path), keep_last

    @classmethod
    def holding(cls, checkpoint_path: Path) -> "RunDir | None":
        """The run directory a checkpoint file lies in (as last.pt, best.pt or checkpoints/step-N.pt), if any."""
        checkpoint_path = Path(checkpoint_path)
        for folder in (checkpoint_path.parent, checkpoint_path.parent.parent):
            if (folder / FOLDER).is_dir() and (folder / LAST).exists():
                return cls(folder)
        return None

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def step_file(self, step: int) -> Path:
        return self.path / FOLDER / f"step-{step:08d}.pt"

    def remove_stale_temporaries(self) -> list[Path]:
        stale = [p for folder in (self.path, self.path / FOLDER) if folder.is_dir()
                 for p in folder.iterdir() if TEMPORARY.fullmatch(p.name)]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, state: dict, step: int) -> Path:
        """Writes checkpoints/step-N.pt, points last.pt at it, prunes old ones."""
        target = self.step_file(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(state, target)
        _point(self.last, target)
        self._prune()
        return target

    def mark_best(self, step: int) -> None:
        """Points best.pt at the checkpoint of `step` (saved before its validation)."""
        _point(self.best, self.step_file(step))

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

    def validations(self) -> ValidationLog:
        path = self.path / VALIDATIONS
        if not path.exists():
            return ValidationLog()
        entries = read_json(path, "the run's validation log").get("validations")
        if not isinstance(entries, list):
            raise CapfastError(f"{path} is not a validation log of capfast train")
        return ValidationLog(entries)

    def write_validations(self, log: ValidationLog) -> None:
        atomic_write_text(self.path / VALIDATIONS, json.dumps({"validations": log.entries}, indent=1) + "\n")

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
