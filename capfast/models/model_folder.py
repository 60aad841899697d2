"""The folder `capfast export` writes: a trained model as files the ecosystem shares, which load without
unpickling anything.

  model.safetensors  the weights only (a tied output head is stored once, as safetensors' save_model does)
  config.json        the ModelRecord's description (model config, vocabulary, image size, input normalization),
                     the capfast version, and where the model comes from ("trained": step, epoch, metrics, data)
  README.md          a short model card
"""

import json
from pathlib import Path

from capfast.common.io import atomic_path, atomic_write_text, ensure_writable_dir, read_json
from capfast.errors import CapfastError
from capfast.models.record import ModelRecord, check_finite

FORMAT = "capfast-model"
VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"


def is_model_folder(path) -> bool:
    """Whether `path` is meant as an exported model: it holds the weights file, or config.json of this format
    (a run directory's config.json is the training config). Its files are checked when it is read."""
    path = Path(path)
    if (path / WEIGHTS_FILE).exists():
        return True
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write(record: ModelRecord, trained: dict, out_dir: Path, source_name: str) -> dict:
    """Writes the three files; returns config.json's contents. `trained`: step, epoch, metrics, data."""
    from importlib.metadata import version

    from safetensors.torch import save_model

    ensure_writable_dir(out_dir, "export folder")
    config = {"format": FORMAT, "version": VERSION, "capfast_version": version("capfast"), **record.description(),
              "trained": trained}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_model(record.build(source_name), str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / CARD_FILE, model_card(config, source_name))
    return config


def model_card(config: dict, source_name: str) -> str:
    m = config["model_config"]
    metrics = config["trained"]["metrics"]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("blind/")) or "none recorded"
    return "\n".join([
        "# capfast image captioner", "",
        f"Encoder `{m['encoder']}` (depth {m['encoder_depth'] or 'all'}) + {m['decoder']} decoder "
        f"(d_model {m['d_model']}), {len(config['vocab'])}-word vocabulary, {config['image_size']}² inputs "
        f"normalized with mean {config['normalization']['mean']}, std {config['normalization']['std']}.",
        f"Exported by capfast {config['capfast_version']} from `{source_name}` at step "
        f"{config['trained']['step']}; validation scores then: {scores}.", "",
        "Files: `model.safetensors` (weights), `config.json` (everything needed to rebuild and preprocess).", "",
        "```bash", "capfast caption --checkpoint THIS_FOLDER photo.jpg",
        "capfast eval --checkpoint THIS_FOLDER --data DATA_DIR --split test", "```", ""])


def read(path: Path) -> tuple[ModelRecord, dict]:
    """(the record, config.json's "trained") from a folder of `capfast export`: JSON and safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    config = read_json(path / CONFIG_FILE, "exported model config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CapfastError(f"{path} is not a model folder written by `capfast export` (no {CONFIG_FILE} of "
                           f"format {FORMAT})")
    if config.get("version") != VERSION:
        raise CapfastError(f"{path} is export version {config.get('version')}, this capfast reads {VERSION}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CapfastError(f"{path} lacks {WEIGHTS_FILE}")
    record = ModelRecord.described(config, {}, path)
    model = record.architecture(path)
    try:
        load_model(model, str(weights))  # strict: every tensor present and of the right shape; tied ones shared
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CapfastError(f"cannot read {weights}: {str(e).splitlines()[0][:160]}") from None
    record.weights = model.state_dict()
    check_finite(weights, record.weights, "refusing to load it")
    return record, config.get("trained", {})
