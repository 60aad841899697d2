"""Checkpoints: one dict per file, self-describing enough to caption without the data directory, and safe to
load whoever made them.

Keys: format, version, model_config (dict for capfast.models.ModelConfig), model (state_dict), vocab (list of
words), image_size, train_config (dict), and for resuming: optimizer, scaler, step, epoch, batch_in_epoch,
best_cider, metrics, world_size, rng (one entry per rank), data (the training data's fingerprint),
config_history.

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
from capfast.common.normalization import Normalization
from capfast.errors import CapfastError

FORMAT = "capfast-checkpoint"
VERSION = 2  # 1 kept numpy RNG objects, which only a full unpickling reads


def save(state: dict, path: Path) -> None:
    """Writes `state` to `path` atomically; on failure (a full disk) `path` is as it was."""
    state = {"format": FORMAT, "version": VERSION, **state}
    check_finite(path, state["model"], "refusing to write it")
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
    if state.get("version") != VERSION:
        raise CapfastError(f"{path} is checkpoint version {state.get('version')}, this capfast reads {VERSION}")
    check_finite(path, state["model"], "refusing to load it")
    return state


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


def check_finite(path, tensors: dict, action: str) -> None:
    """CapfastError naming the first floating tensor of `tensors` (a state_dict) with a NaN or an infinity."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CapfastError(f"checkpoint {path}: {name} holds NaN or infinite values; {action}")


def load_model(path: Path, device="cpu"):
    """(model in eval mode on `device`, Vocab, checkpoint dict) for evaluation and captioning, from a checkpoint
    or a folder of `capfast export`."""
    from capfast.models import ModelConfig, build_captioner
    from capfast.models.export import is_exported, load_exported
    from capfast.store.vocab import Vocab

    if is_exported(path):
        model, state = load_exported(Path(path))
        return model.to(device).eval(), Vocab(tuple(state["vocab"])), state
    state = load(path)
    vocab = Vocab(tuple(state["vocab"]))
    model = build_captioner(ModelConfig.from_dict(state["model_config"]), vocab_size=len(vocab),
                            image_size=state["image_size"],
                            load_encoder_weights=False)  # the checkpoint holds the trained weights
    check_normalization(path, model, Normalization.from_dict(state["normalization"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), vocab, state


def check_normalization(path, model, recorded: Normalization) -> None:
    """The model was trained on images normalized with `recorded`: its encoder must still declare the same."""
    if model.normalization != recorded:
        raise CapfastError(f"{path} was trained with input normalization {recorded.to_dict()}, but encoder "
                           f"{model.cfg.encoder} now declares {model.normalization.to_dict()} (another timm or "
                           f"torchvision version?)")
