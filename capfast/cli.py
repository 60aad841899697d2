"""`capfast` command line: a click group whose subcommands live in the modules that do the work, imported only
when invoked (capfast.common.commands)."""

import sys

import click

from capfast.common.commands import LazyGroup
from capfast.common.runtime import prepare_process
from capfast.errors import CapfastError

COMMANDS = {
    "synth": ("capfast.pack.synth", "Write a synthetic COCO-format captions dataset (for tests and the demo)."),
    "convert": ("capfast.pack.convert", "Pack images + tokenized captions into FFCV .beton files."),
    "inspect": ("capfast.store.beton", "Summarize a .beton written by `capfast convert`."),
    "features": ("capfast.extract.features", "Compute a frozen trunk's features of each split once (a cache)."),
    "train": ("capfast.train.cli", "Train a captioner (DDP, bf16/fp16, channels_last, GPU JPEG decode)."),
    "eval": ("capfast.eval.evaluate", "Score a checkpoint with BLEU/METEOR/ROUGE-L/CIDEr on a split."),
    "caption": ("capfast.eval.caption", "Caption image files with a trained checkpoint."),
    "export": ("capfast.models.export", "Write a checkpoint as model.safetensors + config.json + model card."),
    "bench": ("capfast.bench", "Benchmarks: throughput against baselines run in the same process."),
}


@click.group(cls=LazyGroup, table=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="capfast")
def cli():
    """capfast: train image captioners on MS-COCO without waiting on data.

    \b
    Typical flow:
      capfast synth data/synth                       # or use real COCO
      capfast convert --annotations A.json --images DIR --split train --out data/coco
      capfast train --config configs/coco_r50_transformer.toml --data data/coco --out runs/r50
      capfast eval --checkpoint runs/r50/best.pt --data data/coco --split val
      capfast caption --checkpoint runs/r50/best.pt my_photo.jpg
      capfast export runs/r50/best.pt models/r50     # safetensors + config.json
    """


def main(argv=None):
    prepare_process()
    try:
        cli.main(args=argv, prog_name="capfast", standalone_mode=False)
    except CapfastError as e:
        line = _error_line(e)
        if line:
            click.echo(f"capfast: error: {line}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("capfast: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # one line, as for every other bad input
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"capfast: error: {e.format_message()}{where}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("capfast: interrupted", err=True)
        sys.exit(130)


def _error_line(error: CapfastError) -> str | None:
    """The error's line, or None where another rank of this node printed it (capfast.common.distributed)."""
    distributed = sys.modules.get("capfast.common.distributed")  # not imported: no process group, and no torch
    return distributed.error_line(str(error), own=error.own) if distributed else str(error)
