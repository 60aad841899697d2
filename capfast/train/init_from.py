"""`init_from`: start a run from another run's model (e.g. SCST from a cross-entropy checkpoint)."""

from pathlib import Path

from capfast.errors import CapfastError
from capfast.models import ModelConfig
from capfast.models.backbones import fixed_input_size
from capfast.models.load import read_model
from capfast.store.checks import check_same_vocabulary
from capfast.store.vocab import Vocab


def initial_model(init_from: str, vocab: Vocab, image_size: int) -> tuple[ModelConfig, dict]:
    """The model config and weights of `init_from` (a checkpoint, a run directory or a folder of `capfast
    export`): the run trains that architecture from those weights; its optimizer, step and RNG are not used. Its
    vocabulary must be the data's. Read only when a run starts: a resumed run's model comes from its last.pt."""
    path = Path(init_from)
    if not path.exists():
        raise CapfastError(f"init_from checkpoint not found: {path}")
    record = read_model(path).record
    check_same_vocabulary(f"init_from {path}", record.vocab, "the data's vocab.json", vocab.fingerprint())
    if record.image_size != image_size and fixed_input_size(record.config.encoder):
        raise CapfastError(f"init_from {path} was trained at data.image_size={record.image_size}; its "
                           f"{record.config.encoder} encoder needs the same here (got {image_size})")
    return record.config, record.weights
