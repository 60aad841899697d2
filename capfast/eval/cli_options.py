"""The options `capfast eval` and `capfast caption` share: which checkpoint, how to generate, on which device."""

from pathlib import Path

import click

from capfast.common.options import checked_field, default
from capfast.common.precision import DEVICES
from capfast.errors import CapfastError
from capfast.models.generate import GenerationOptions


def checked_by(cls):
    """A click callback: the option's value checked by the rules of field `param.name` of the dataclass `cls`
    (declare its default from the same field), so a flag and the recipe key it mirrors accept the same values."""
    def callback(ctx, param, value):
        try:
            return checked_field(cls, param.name, value, key=param.opts[0])
        except CapfastError as e:
            raise click.UsageError(str(e), ctx) from None  # BadParameter would name the flag twice

    return callback


def generation_options(command):
    """--checkpoint, --beam, --max-len and --device, in that order in --help."""
    options = [
        click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(path_type=Path),
                     help="A checkpoint written by `capfast train` (best.pt or last.pt), or a folder of "
                          "`capfast export`."),
        click.option("--beam", "beam_size", type=int, default=default(GenerationOptions, "beam_size"),
                     show_default=True, callback=checked_by(GenerationOptions), help="Beam size; 1 = greedy."),
        click.option("--max-len", type=int, default=default(GenerationOptions, "max_len"), show_default=True,
                     callback=checked_by(GenerationOptions), help="Longest generated caption, in tokens."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
                     help="auto: the GPU where there is one."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
