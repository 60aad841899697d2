"""`init_from`: start a run from another run's model (e.g. SCST from a cross-entropy checkpoint)."""

from pathlib import Path

from capfast.errors import CapfastError
from capfast.models import ModelConfig, checkpoint
from capfast.models.backbones import fixed_input_size
from capfast.models.export import is_exported
from capfast.store.checks import check_same_vocabulary
from capfast.store.vocab import Vocab


def initial_weights(cfg, vocab: Vocab) -> dict | None:
    """The state_dict of cfg.init_from (None when unset). The run adopts that checkpoint's model config (it
    replaces cfg.model, so checkpoints and config.json record the architecture trained); its optimizer, step
    and RNG are not used. The checkpoint's vocabulary must be the data's. A folder of `capfast export` works too."""
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    if not path.exists():
        raise CapfastError(f"init_from checkpoint not found: {path}")
    # a checkpoint's state as it is (checked before a model is built from it); a folder's through its model
    state = checkpoint.load_model(path)[2] if is_exported(path) else checkpoint.load(path)
    check_same_vocabulary(f"init_from {path}", Vocab(tuple(state["vocab"])), "the data's vocab.json",
                          vocab.fingerprint())
    cfg.model = ModelConfig.from_dict(state["model_config"])
    if state["image_size"] != cfg.data.image_size and fixed_input_size(cfg.model.encoder):
        raise CapfastError(f"init_from {path} was trained at data.image_size={state['image_size']}; its "
                           f"{cfg.model.encoder} encoder needs the same here (got {cfg.data.image_size})")
    return state["model"]
