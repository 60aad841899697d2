"""The options `capfast eval` and `capfast caption` share: which checkpoint, how to generate, on which device."""

from pathlib import Path

import click

from capfast.common.precision import DEVICES
from capfast.models.generate import check_beam_size

DEFAULT_BEAM, DEFAULT_MAX_LEN = 3, 20


def _beam(ctx, param, value: int) -> int:
    check_beam_size(value, "--beam")
    return value


def generation_options(command):
    """--checkpoint, --beam, --max-len and --device, in that order in --help."""
    options = [
        click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(path_type=Path),
                     help="A checkpoint written by `capfast train` (best.pt or last.pt), or a folder of "
                          "`capfast export`."),
        click.option("--beam", "beam_size", default=DEFAULT_BEAM, show_default=True, callback=_beam,
                     help="Beam size; 1 = greedy."),
        click.option("--max-len", default=DEFAULT_MAX_LEN, show_default=True, type=click.IntRange(min=1),
                     help="Longest generated caption, in tokens."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
                     help="auto: the GPU where there is one."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
