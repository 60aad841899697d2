"""Checkpoint files: one dict per file, safe to load whoever made them.

A checkpoint of `capfast train` holds four parts, each with its own state_dict: "model" (the ModelRecord:
capfast/models/record.py), "train" (where the run stands: capfast/train/state.py), "optimizer" and "scaler".
Version 2 (flat keys, before those parts) still loads for using its model; resuming needs version 3.

Only tensors, numbers, strings, None, lists, tuples and dicts: load() reads with torch.load(weights_only=True),
which refuses anything else without running it, so a checkpoint from someone else cannot run code here. Before
that, every member of the file's zip archive must match its CRC-32 (torch.load does not look), so a flipped bit
is an error, not a silently different model; and a model with a non-finite weight is refused. save() writes a
temporary file, fsyncs it and renames it into place (capfast/common/io.py).
"""

import pickle
import zipfile
from pathlib import Path

import torch

from capfast.common.io import atomic_path
from capfast.errors import CapfastError
from capfast.models.record import DESCRIPTION_KEYS, check_finite

FORMAT = "capfast-checkpoint"
VERSION = 3
READABLE_VERSIONS = (2, 3)  # 1 kept numpy RNG objects, which only a full unpickling reads


def save(state: dict, path: Path) -> None:
    """Writes `state` ({"model": ModelRecord.state_dict(), ...}) to `path` atomically; on failure (a full disk)
    `path` is as it was."""
    state = {"format": FORMAT, "version": VERSION, **state}
    check_finite(f"checkpoint {path}", state["model"]["weights"], "refusing to write it")
    try:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as file:
            _save_to(file, state)
    except OSError as e:
        raise CapfastError(f"cannot write checkpoint {path}: {e.strerror or e} (the checkpoints already written "
                           "are intact)") from None


def _save_to(file, state: dict) -> None:
    """torch.save through a file object: torch's own file writer turns a full disk into a RuntimeError whose
    message names nothing; Python's write raises the OSError that says what happened."""
    writer = _Writer(file)
    try:
        torch.save(state, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


class _Writer:
    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def load(path: Path, map_location="cpu") -> dict:
    """The checkpoint's parts: {"version", "model", "train", ...}; a version-2 file gives "model" and, of "train",
    what says where the model comes from (step, epoch, data, metrics)."""
    path = Path(path)
    if not path.is_file():
        raise CapfastError(f"checkpoint not found: {path}")
    verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[-1].strip() if str(e) else e.__class__.__name__
        raise CapfastError(f"refusing {path}: it holds objects other than tensors and plain values, and loading "
                           f"them would run their code ({reason[:160]})") from None
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CapfastError(f"cannot read checkpoint {path}: not a valid torch file ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CapfastError(f"{path} is not a capfast checkpoint")
    if state.get("version") not in READABLE_VERSIONS:
        raise CapfastError(f"{path} is checkpoint version {state.get('version')}, this capfast reads "
                           f"{' and '.join(map(str, READABLE_VERSIONS))}")
    if state["version"] == 2:
        state = _version_2_model(state)
    check_finite(f"checkpoint {path}", state["model"]["weights"], "refusing to load it")
    return state


def _version_2_model(state: dict) -> dict:
    """Version 2 kept the model's record as flat keys beside the training state's."""
    model = {key: state[key] for key in DESCRIPTION_KEYS}
    return {"version": 2, "model": {**model, "weights": state["model"]},
            "train": {key: state[key] for key in ("step", "epoch", "data", "metrics")}}


def verify_archive(path: Path) -> None:
    """Every member of the checkpoint's zip archive matches its stored CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CapfastError(f"cannot read checkpoint {path}: not a valid torch file ({e.__class__.__name__})") from None
    if damaged is not None:
        raise CapfastError(f"checkpoint {path} is damaged: {damaged} does not match its checksum (a bit changed "
                           "on disk or in transit)")
