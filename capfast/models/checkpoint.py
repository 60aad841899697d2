"""Checkpoints: one dict per file, written atomically, self-describing enough to caption without the data dir.

Keys: format, version, model_config (dict for capfast.models.ModelConfig), model (state_dict), vocab (list of
words), image_size, train_config (dict), and for resuming: optimizer, scaler, scheduler, step, epoch,
batch_in_epoch, rng, metrics.
"""

from pathlib import Path

import torch

from capfast.common.io import atomic_path
from capfast.errors import CapfastError

FORMAT = "capfast-checkpoint"
VERSION = 1


def save(state: dict, path: Path) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CapfastError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CapfastError(f"cannot read checkpoint {path}: not a valid torch file ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CapfastError(f"{path} is not a capfast checkpoint")
    if state.get("version") != VERSION:
        raise CapfastError(f"{path} is checkpoint version {state.get('version')}, this capfast reads {VERSION}")
    return state


def load_model(path: Path, device="cpu"):
    """(model in eval mode on `device`, Vocab, checkpoint dict) for evaluation and captioning."""
    from capfast.models import ModelConfig, build_captioner
    from capfast.store.vocab import Vocab

    state = load(path)
    vocab = Vocab(tuple(state["vocab"]))
    model = build_captioner(ModelConfig.from_dict(state["model_config"]), vocab_size=len(vocab),
                            load_encoder_weights=False)  # the checkpoint holds the trained weights
    model.load_state_dict(state["model"])
    return model.to(device).eval(), vocab, state
