"""A trained model from whatever names one: a checkpoint file, a folder of `capfast export`, or a run directory
of `capfast train` (its best.pt, else its last.pt). `capfast eval`, `capfast caption`, `capfast export` and
`init_from` all read models through read_model."""

import sys
from dataclasses import dataclass
from pathlib import Path

from capfast.errors import CapfastError
from capfast.models import checkpoint, model_folder
from capfast.models.record import ModelRecord
from capfast.models.run_dir import BEST, LAST

TRAINED = ("step", "epoch", "data", "metrics")  # a version-2 checkpoint kept its validation's metrics itself


@dataclass
class LoadedModel:
    record: ModelRecord
    source: Path   # the checkpoint file or model folder read
    trained: dict  # where the model comes from: step, epoch, data (and metrics, for a model folder)


def read_model(path, note=None) -> LoadedModel:
    """The model `path` names; a run directory is noted (`note(message)`, default: stderr) with the file used."""
    path = Path(path)
    if path.is_dir():
        if model_folder.is_model_folder(path):
            record, trained = model_folder.read(path)
            return LoadedModel(record, path, trained)
        chosen = _run_checkpoint(path)
        (note or _note_on_stderr)(f"{path} is a run directory: using its {chosen.name}")
        path = chosen
    state = checkpoint.load(path)
    return LoadedModel(ModelRecord.from_state_dict(state["model"], f"checkpoint {path}"), path,
                       {key: value for key, value in state.get("train", {}).items() if key in TRAINED})


def load_model(path, device="cpu", note=None):
    """(the captioner in eval mode on `device`, its ModelRecord) for evaluation and captioning."""
    loaded = read_model(path, note)
    return loaded.record.build(loaded.source, device), loaded.record


def _run_checkpoint(path: Path) -> Path:
    for name in (BEST, LAST):
        if (path / name).is_file():
            return path / name
    raise CapfastError(f"{path} is neither a model folder of `capfast export` ({model_folder.CONFIG_FILE} and "
                       f"{model_folder.WEIGHTS_FILE}) nor a run directory of `capfast train` ({BEST} or {LAST})")


def _note_on_stderr(message: str) -> None:
    print(f"capfast: note: {message}", file=sys.stderr, flush=True)
