"""`capfast` command line: a click group whose subcommands live in the modules that do the work.

Subcommands are imported only when invoked, so `capfast --help` stays fast and a command never pays for
another's heavy imports (ffcv, tensorboard, pycocoevalcap).
"""

import importlib
import sys

import click

from capfast.errors import CapfastError

COMMANDS = {
    "synth": ("capfast.synth", "Write a synthetic COCO-format captions dataset (for tests and the demo)."),
    "convert": ("capfast.convert", "Pack images + tokenized captions into FFCV .beton files."),
    "inspect": ("capfast.inspect_beton", "Summarize a .beton written by `capfast convert`."),
    "train": ("capfast.train.cli", "Train a captioner (DDP, bf16/fp16, channels_last, GPU JPEG decode)."),
    "eval": ("capfast.evaluate", "Score a checkpoint with BLEU/METEOR/ROUGE-L/CIDEr on a split."),
    "caption": ("capfast.caption", "Caption image files with a trained checkpoint."),
    "bench": ("capfast.bench", "Benchmarks: convert, loader and train throughput against baselines."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name][0]).command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="capfast")
def cli():
    """capfast: train image captioners on MS-COCO without waiting on data.

    \b
    Typical flow:
      capfast synth data/synth                       # or use real COCO
      capfast convert --annotations A.json --images DIR --split train --out data/coco
      capfast train --config configs/coco_r50_transformer.toml --data data/coco --out runs/r50
      capfast eval --checkpoint runs/r50/best.pt --data data/coco/val.beton
      capfast caption --checkpoint runs/r50/best.pt my_photo.jpg
    """


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="capfast", standalone_mode=False)
    except CapfastError as e:
        click.echo(f"capfast: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("capfast: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("capfast: interrupted", err=True)
        sys.exit(130)
