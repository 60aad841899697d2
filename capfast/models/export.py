"""`capfast export`: a trained model as files the ecosystem shares, which load without unpickling anything.

OUT_DIR/model.safetensors  the weights only (a tied output head is stored once, as safetensors' save_model does)
OUT_DIR/config.json        model config, vocabulary, image size, input normalization, capfast version
OUT_DIR/README.md          a short model card

`capfast eval`, `capfast caption` and `init_from` take the folder wherever they take a checkpoint.
"""

import json
from pathlib import Path

import click

from capfast.common.io import atomic_path, atomic_write_text, ensure_writable_dir, read_json
from capfast.common.normalization import Normalization
from capfast.errors import CapfastError

FORMAT = "capfast-model"
VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"


def is_exported(path) -> bool:
    return Path(path).is_dir()


def export(checkpoint_path: Path, out_dir: Path) -> dict:
    """Writes the three files from a `capfast train` checkpoint; returns config.json's contents."""
    from importlib.metadata import version

    from safetensors.torch import save_model

    from capfast.models.checkpoint import load_model

    model, vocab, state = load_model(checkpoint_path)
    ensure_writable_dir(out_dir, "export folder")
    config = {
        "format": FORMAT, "version": VERSION, "capfast_version": version("capfast"),
        "model_config": state["model_config"], "vocab": list(vocab.words), "image_size": state["image_size"],
        "normalization": state["normalization"],
        "trained": {"step": state["step"], "epoch": state["epoch"], "metrics": state["metrics"],
                    "data": state["data"]},
    }
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / CARD_FILE, model_card(config, checkpoint_path))
    return config


def model_card(config: dict, checkpoint_path: Path) -> str:
    m = config["model_config"]
    metrics = config["trained"]["metrics"]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("blind/")) or "none recorded"
    return "\n".join([
        "# capfast image captioner", "",
        f"Encoder `{m['encoder']}` (depth {m['encoder_depth'] or 'all'}) + {m['decoder']} decoder "
        f"(d_model {m['d_model']}), {len(config['vocab'])}-word vocabulary, {config['image_size']}² inputs "
        f"normalized with mean {config['normalization']['mean']}, std {config['normalization']['std']}.",
        f"Exported by capfast {config['capfast_version']} from `{checkpoint_path.name}` at step "
        f"{config['trained']['step']}; validation scores then: {scores}.", "",
        "Files: `model.safetensors` (weights), `config.json` (everything needed to rebuild and preprocess).", "",
        "```bash", "capfast caption --checkpoint THIS_FOLDER photo.jpg",
        "capfast eval --checkpoint THIS_FOLDER --data DATA_DIR --split test", "```", ""])


def load_exported(path: Path):
    """(model on the CPU, and what a checkpoint holds for using it: model_config, model (its state_dict), vocab,
    image_size, normalization) from an exported folder: JSON and safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from capfast.models import ModelConfig, build_captioner
    from capfast.models.checkpoint import check_finite, check_normalization

    config = read_json(path / CONFIG_FILE, "exported model config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CapfastError(f"{path} is not a model folder written by `capfast export` (no {CONFIG_FILE} of "
                           f"format {FORMAT})")
    if config.get("version") != VERSION:
        raise CapfastError(f"{path} is export version {config.get('version')}, this capfast reads {VERSION}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CapfastError(f"{path} lacks {WEIGHTS_FILE}")
    model = build_captioner(ModelConfig.from_dict(config["model_config"]), vocab_size=len(config["vocab"]),
                            image_size=config["image_size"], load_encoder_weights=False)
    check_normalization(path, model, Normalization.from_dict(config["normalization"]))
    try:
        load_model(model, str(weights))  # strict: every tensor present and of the right shape
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CapfastError(f"cannot read {weights}: {str(e).splitlines()[0][:160]}") from None
    state = model.state_dict()
    check_finite(weights, state, "refusing to load it")
    return model, {"model_config": config["model_config"], "model": state, "vocab": config["vocab"],
                   "image_size": config["image_size"], "normalization": config["normalization"]}


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
def command(checkpoint, out_dir):
    """Write CHECKPOINT (best.pt or last.pt of `capfast train`) to OUT_DIR as model.safetensors (weights only),
    config.json (model config, vocabulary, image size, normalization) and a model card, README.md.
    `capfast eval`, `capfast caption` and init_from= accept OUT_DIR; reading it unpickles nothing."""
    config = export(checkpoint, out_dir)
    click.echo(f"exported {checkpoint} -> {out_dir} ({config['model_config']['encoder']} + "
               f"{config['model_config']['decoder']}, {len(config['vocab'])} words)")
