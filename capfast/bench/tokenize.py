"""`capfast bench tokenize`: caption tokenizer throughput against the Java PTBTokenizer it ports.

The baseline is what a user of the COCO caption evaluation runs otherwise: pycocoevalcap's PTBTokenizer, one
Java process for all the captions (its start-up included: that is what each call pays). Where `java` is not on
PATH, the baseline is a lower bound on any tokenizer's work instead: one lower-cased regex word split. capfast's
rate counts this thread's CPU time (single-threaded; a busy machine does not inflate it); the Java one is wall time.
"""

import re
import shutil
import time

import click


def sample_captions(count: int) -> list[str]:
    """COCO-like captions with the constructs the PTB rules care about: possessives, commas, numbers, a period."""
    return [f"A man's board, number {i % 50}, rides wave {i} on top of a surfboard." for i in range(count)]


def java_ptb(captions: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [tokenized[i][0] for i in range(len(captions))]


def regex_split(captions: list[str]) -> list[str]:
    word = re.compile(r"\w+|[^\w\s]")
    return [" ".join(word.findall(c.lower())) for c in captions]


@click.command()
@click.option("--captions", default=20_000, show_default=True, help="Captions tokenized by each contender.")
def command(captions):
    """Captions per second: capfast's PTB port against the Java PTBTokenizer (or a regex split without java)."""
    from capfast.store.ptb_tokenizer import tokenize

    lines = sample_captions(captions)
    tokenize("Warm-up: compile the lexer.")
    cpu = time.thread_time()
    ours = [" ".join(tokenize(c)) for c in lines]
    rate = captions / (time.thread_time() - cpu)

    name, baseline = ("Java PTBTokenizer", java_ptb) if shutil.which("java") else ("regex word split", regex_split)
    wall = time.perf_counter()
    theirs = baseline(lines)
    baseline_rate = captions / (time.perf_counter() - wall)
    agree = sum(a == b for a, b in zip(ours, theirs)) / captions
    click.echo(f"capfast tokenizer (1 thread): {rate:,.0f} captions per CPU-second")
    click.echo(f"{name}: {baseline_rate:,.0f} captions/s wall; same tokens for {agree:.1%} of the captions")
    click.echo(f"capfast_captions_s={rate:.0f} baseline_captions_s={baseline_rate:.0f} "
               f"ratio={rate / baseline_rate:.2f}")
