"""`capfast bench ...`: throughput benchmarks, each against a baseline run in the same process."""

import click

from capfast.common.commands import LazyGroup

SUBCOMMANDS = {
    "convert": ("capfast.bench.convert", "convert img/s vs a single-process PIL resize+encode loop"),
    "loader": ("capfast.bench.loader", "loader img/s vs torch DataLoader + PIL decode"),
    "train": ("capfast.bench.train", "train-step img/s: real loader vs GPU-resident synthetic batch"),
    "features": ("capfast.bench.features", "train steps/s from a feature cache vs the frozen trunk on the fly"),
    "reward": ("capfast.bench.reward", "SCST CIDEr-D reward captions/s per core vs plain Python CIDEr-D"),
    "tokenize": ("capfast.bench.tokenize", "caption tokenizer captions/s vs the Java PTBTokenizer it ports"),
    "verify": ("capfast.bench.verify", "inspect --verify MB/s vs one plain sequential read of the same file"),
}


@click.group(cls=LazyGroup, table=SUBCOMMANDS, section="Benchmarks")
def command():
    """Throughput benchmarks. Each prints a ratio against a baseline measured in the same run,
    and ends with one machine-readable line of key=value pairs."""
