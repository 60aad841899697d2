"""`capfast bench reward`: SCST reward throughput (CIDEr-D captions/s on one core) vs a plain Python CIDEr-D.

Both run on one thread; "per core" divides by that thread's CPU time (time.thread_time), which a busy shared
machine does not inflate the way it inflates wall time. Wall rates are printed too.

The baseline is the formula as pycocoevalcap and self-critical.pytorch's CiderD write it (dicts of n-gram
counts), with the corpus document frequencies and every reference's tf-idf vector computed before the clock
starts, so it is timed at its best. Both score the same captions; the two must agree to 1e-9.
"""

import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np

EOS = 2


def synthetic_corpus(images: int, seed: int, vocab_size: int = 10_000) -> tuple[dict, list[str]]:
    """COCO-like references: 5 per image, 8-16 words from a Zipfian vocabulary, and some out-of-vocabulary words."""
    rng = random.Random(seed)
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size)]
    pool = words[4:] + [f"rare{i}" for i in range(vocab_size // 2)]
    weights = [1.0 / (i + 1) for i in range(len(pool))]
    corpus = {image_id: [rng.choices(pool, weights, k=rng.randint(8, 16)) for _ in range(5)]
              for image_id in range(images)}
    return corpus, words


def candidates(corpus: dict, words: list[str], count: int, seed: int, width: int = 16):
    """Sample-like captions: an image's reference with ~30 % of its words replaced, as id rows ending in eos."""
    rng = random.Random(seed)
    index = {w: i for i, w in enumerate(words)}
    image_ids = rng.choices(list(corpus), k=count)
    rows = np.zeros((count, width + 1), dtype=np.int64)
    for row, image_id in zip(rows, image_ids):
        ref = rng.choice(corpus[image_id])[:width]
        ids = [index.get(w, 3) if rng.random() > 0.3 else rng.randrange(4, len(words)) for w in ref]
        row[:len(ids)] = ids
        row[len(ids)] = EOS
    return rows, np.asarray(image_ids, dtype=np.int64)


class PlainCiderD:
    """The formula with Python dicts, as in pycocoevalcap's cider_scorer.py, df from the corpus."""

    def __init__(self, corpus: dict):
        self.df = Counter(g for refs in corpus.values() for g in {g for ref in refs for g in self.ngrams(ref)})
        self.log_images = math.log(len(corpus))
        self.refs = {image_id: [self.vector(ref) for ref in refs] for image_id, refs in corpus.items()}

    @staticmethod
    def ngrams(words) -> Counter:
        return Counter(tuple(words[i:i + n]) for n in range(1, 5) for i in range(len(words) - n + 1))

    def vector(self, words):
        vec = [{} for _ in range(4)]
        for g, tf in self.ngrams(words).items():
            vec[len(g) - 1][g] = tf * (self.log_images - math.log(max(1.0, self.df[g])))
        norms = [math.sqrt(sum(v * v for v in part.values())) for part in vec]
        return vec, norms, max(len(words) - 1, 0)

    def score(self, words, image_id) -> float:
        vec, norms, length = self.vector(words)
        total = [0.0] * 4
        refs = self.refs[image_id]
        for ref_vec, ref_norms, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / 72.0)
            for n in range(4):
                val = sum(min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, v in vec[n].items())
                if norms[n] and ref_norms[n]:
                    val /= norms[n] * ref_norms[n]
                total[n] += val * penalty
        return sum(total) / 4 / len(refs) * 10


def load_data_corpus(data_dir: Path):
    from capfast.store import schema
    from capfast.store.ptb_tokenizer import tokenize_references
    from capfast.store.references import load_references
    from capfast.store.vocab import Vocab

    corpus = tokenize_references(load_references(schema.refs_path(data_dir, "train")))
    return corpus, list(Vocab.load(data_dir / schema.VOCAB_FILE).words)


@click.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Use this converted data dir's training references (default: a synthetic COCO-sized corpus).")
@click.option("--images", default=20_000, show_default=True, help="Synthetic corpus size, in images (5 refs each).")
@click.option("--captions", default=25_600, show_default=True, help="Captions scored by capfast.")
@click.option("--baseline-captions", default=2_000, show_default=True, help="Captions scored by the plain baseline.")
@click.option("--batch", default=1_280, show_default=True, help="Captions per call (256 images x 5 samples).")
@click.option("--seed", default=0, show_default=True)
def command(data_dir, images, captions, baseline_captions, batch, seed):
    """CIDEr-D reward throughput on one core (numba kernel) against a plain Python implementation."""
    from capfast.eval.cider import CiderD

    corpus, words = load_data_corpus(data_dir) if data_dir else synthetic_corpus(images, seed)
    start = time.perf_counter()
    reward = CiderD.from_token_lists(corpus, words)
    click.echo(f"corpus: {len(corpus):,} images, {sum(map(len, corpus.values())):,} references, "
               f"{len(reward.tables['keys']):,} distinct n-grams; tables built in {time.perf_counter() - start:.1f} s")
    rows, image_ids = candidates(corpus, words, captions, seed + 1)
    reward.score(rows[:batch], image_ids[:batch], EOS)  # compiles (or loads the cached machine code)
    clock = _Clock()
    scores = np.concatenate([reward.score(rows[i:i + batch], image_ids[i:i + batch], EOS)
                             for i in range(0, len(rows), batch)])
    fast_wall, fast = clock.rates(len(rows))

    plain = PlainCiderD(corpus)
    n = min(baseline_captions, len(rows))
    as_words = [[words[i] if i != 3 else "\x00unk" for i in row[:np.argmax(row == EOS)]] for row in rows[:n]]
    clock = _Clock()
    expected = [plain.score(w, int(i)) for w, i in zip(as_words, image_ids[:n])]
    slow_wall, slow = clock.rates(n)
    error = float(np.abs(scores[:n] - np.array(expected)).max())
    if not error < 1e-9:
        from capfast.errors import CapfastError
        raise CapfastError(f"the reward differs from the plain implementation by {error:.1e} (more than 1e-9)")
    click.echo(f"capfast (numba, 1 thread): {fast:,.0f} captions per CPU-second ({fast_wall:,.0f}/s wall)   "
               f"mean CIDEr-D {scores.mean():.3f}")
    click.echo(f"plain Python dicts:        {slow:,.0f} captions per CPU-second ({slow_wall:,.0f}/s wall)   "
               f"max |difference| {error:.1e}")
    click.echo(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (wall rates shrink with the load; "
               f"per-core rates count this thread's CPU time)")
    click.echo(f"captions_per_s_per_core={fast:.0f} baseline_captions_per_s_per_core={slow:.0f} "
               f"ratio={fast / slow:.1f} wall_captions_per_s={fast_wall:.0f}")


class _Clock:
    """Wall time and this thread's CPU time: both single-threaded, so captions per CPU-second = per core."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def rates(self, count: int) -> tuple[float, float]:
        return count / (time.perf_counter() - self.wall), count / (time.thread_time() - self.cpu)
