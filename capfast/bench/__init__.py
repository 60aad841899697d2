"""`capfast bench ...`: throughput benchmarks, each against a baseline run in the same process."""

import importlib

import click

SUBCOMMANDS = {
    "convert": ("capfast.bench.convert", "convert img/s vs a single-process PIL resize+encode loop"),
    "loader": ("capfast.bench.loader", "loader img/s vs torch DataLoader + PIL decode"),
    "train": ("capfast.bench.train", "train-step img/s: real loader vs GPU-resident synthetic batch"),
    "reward": ("capfast.bench.reward", "SCST CIDEr-D reward captions/s per core vs plain Python CIDEr-D"),
    "tokenize": ("capfast.bench.tokenize", "caption tokenizer captions/s vs the Java PTBTokenizer it ports"),
}


class _LazyBench(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        return importlib.import_module(SUBCOMMANDS[name][0]).command

    def format_commands(self, ctx, formatter):
        with formatter.section("Benchmarks"):
            formatter.write_dl([(n, h) for n, (_, h) in SUBCOMMANDS.items()])


@click.group(cls=_LazyBench)
def command():
    """Throughput benchmarks. Each prints a ratio against a baseline measured in the same run,
    and ends with one machine-readable line of key=value pairs."""
