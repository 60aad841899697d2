"""`init_from`: start a run from another run's model (e.g. SCST from a cross-entropy checkpoint)."""

from pathlib import Path

from capfast import checkpoint
from capfast.errors import CapfastError
from capfast.models import ModelConfig
from capfast.vocab import Vocab


def initial_weights(cfg, vocab: Vocab) -> dict | None:
    """The state_dict of cfg.init_from (None when unset). The run adopts that checkpoint's model config (it
    replaces cfg.model, so checkpoints and config.json record the architecture trained); its optimizer, step
    and RNG are not used. The checkpoint's vocabulary must be the data's."""
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    if not path.is_file():
        raise CapfastError(f"init_from checkpoint not found: {path}")
    state = checkpoint.load(path)
    if list(state["vocab"]) != list(vocab.words):
        raise CapfastError(f"init_from {path} was trained with a different vocabulary ({len(state['vocab'])} "
                           f"words) than the data's vocab.json ({len(vocab)} words)")
    cfg.model = ModelConfig.from_dict(state["model_config"])
    return state["model"]
