"""`capfast export`: a trained model as a folder of model.safetensors, config.json and a model card
(capfast/models/model_folder.py), which `capfast eval`, `capfast caption` and `init_from` read without
unpickling anything."""

from pathlib import Path

import click

from capfast.models import model_folder
from capfast.models.load import read_model
from capfast.models.run_dir import RunDir


def export(source: Path, out_dir: Path) -> dict:
    """Writes the folder from a checkpoint, run directory or model folder; returns config.json's contents."""
    loaded = read_model(source)
    trained = {**loaded.trained, "metrics": loaded.trained.get("metrics") or validation_metrics(loaded)}
    return model_folder.write(loaded.record, trained, Path(out_dir), loaded.source.name)


def validation_metrics(loaded) -> dict:
    """The metrics of the validation that followed the checkpoint's save, where its run directory logged one."""
    run = RunDir.holding(loaded.source)
    validation = run.validations().at(loaded.trained["step"]) if run is not None else None
    return validation["metrics"] if validation else {}


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
def command(checkpoint, out_dir):
    """Write CHECKPOINT (best.pt or last.pt of `capfast train`, or its run directory: best.pt) to OUT_DIR as
    model.safetensors (weights only), config.json (model config, vocabulary, image size, normalization) and a
    model card, README.md. `capfast eval`, `capfast caption` and init_from= accept OUT_DIR; reading it unpickles
    nothing."""
    config = export(checkpoint, out_dir)
    click.echo(f"exported {checkpoint} -> {out_dir} ({config['model_config']['encoder']} + "
               f"{config['model_config']['decoder']}, {len(config['vocab'])} words)")
