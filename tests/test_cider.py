"""The CIDEr-D reward on token ids against a plain implementation of the formula and pycocoevalcap's scorer."""

import math
import random
from collections import Counter

import numpy as np
import pytest

from capfast.eval.cider import CiderD, words_before
from capfast.store.vocab import SPECIALS

WORDS = list(SPECIALS) + [f"w{i}" for i in range(30)]  # the vocabulary: ids 4..33 are words
OOV = [f"rare{i}" for i in range(8)] + ["<unk>"]        # words in references that the vocabulary lacks
EOS, UNK = 2, 3
SAMPLE_UNK = "\x00sampled-unk"  # a sampled <unk> matches no reference word, a literal "<unk>" included


def plain_cider_d(candidate: list[str], refs: list[list[str]], corpus: list[list[list[str]]]) -> float:
    """CIDEr-D as pycocoevalcap's cider_scorer.py computes it, with df from `corpus` (each image's refs)."""
    def ngrams(words):
        return Counter(tuple(words[i:i + n]) for n in range(1, 5) for i in range(len(words) - n + 1))

    df = Counter(g for image in corpus for g in {g for ref in image for g in ngrams(ref)})
    log_images = math.log(len(corpus))

    def vector(words):
        vec = {g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in ngrams(words).items()}
        norms = [math.sqrt(sum(v * v for g, v in vec.items() if len(g) == n)) for n in range(1, 5)]
        return vec, norms, max(len(words) - 1, 0)  # pycocoevalcap's "length" counts bigrams

    vec, norms, length = vector(candidate)
    total = [0.0] * 4
    for ref in refs:
        ref_vec, ref_norms, ref_length = vector(ref)
        for n in range(4):
            val = sum(min(v, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, v in vec.items() if len(g) == n + 1)
            if norms[n] and ref_norms[n]:
                val /= norms[n] * ref_norms[n]
            total[n] += val * math.exp(-((length - ref_length) ** 2) / (2 * 6.0 ** 2))
    return sum(total) / 4 / len(refs) * 10


def random_corpus(rng: random.Random, images: int = 40) -> dict:
    pool = WORDS[4:] + OOV
    weights = [1.0 / (i + 1) for i in range(len(pool))]  # skewed, so n-grams recur across images
    return {1000 + i: [rng.choices(pool, weights, k=rng.randint(0, 12)) for _ in range(rng.randint(1, 6))]
            for i in range(images)}


def random_candidates(rng: random.Random, corpus: dict, count: int, width: int = 16):
    """Token id rows (eos somewhere or nowhere, junk after it) with their image ids: perturbed references and
    random id strings, with <unk> among them."""
    index = {w: i for i, w in enumerate(WORDS)}
    image_ids = rng.choices(list(corpus), k=count)
    rows = np.full((count, width), 0, dtype=np.int64)
    for row, image_id in zip(rows, image_ids):
        ref = rng.choice(corpus[image_id])
        ids = [index.get(w, UNK) if rng.random() < 0.8 else rng.randrange(3, len(WORDS)) for w in ref]
        if rng.random() < 0.3:
            ids = [rng.randrange(3, len(WORDS)) for _ in range(rng.randint(0, width))]
        ids = ids[:width]
        row[:len(ids)] = ids
        if len(ids) < width:
            row[len(ids)] = EOS
            row[len(ids) + 1:] = [rng.randrange(0, len(WORDS)) for _ in range(width - len(ids) - 1)]
    return rows, np.asarray(image_ids)


def as_words(row) -> list[str]:
    return [SAMPLE_UNK if i == UNK else WORDS[i] for i in row[:words_before(row[None], EOS)[0]]]


def test_matches_a_plain_implementation_on_random_captions():
    rng = random.Random(0)
    corpus = random_corpus(rng)
    reward = CiderD.from_token_lists(corpus, WORDS)
    rows, image_ids = random_candidates(rng, corpus, 300)
    got = reward.score(rows, image_ids, EOS)
    want = [plain_cider_d(as_words(row), corpus[i], list(corpus.values())) for row, i in zip(rows, image_ids)]
    assert np.abs(got - np.array(want)).max() < 1e-9
    assert got.max() > 1.0 and (got == 0).sum() < len(got) // 2  # plenty of matching n-grams were exercised


def test_matches_pycocoevalcap_when_df_comes_from_the_scored_references():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    rng = random.Random(1)
    corpus = random_corpus(rng, images=30)
    reward = CiderD.from_token_lists(corpus, WORDS)
    rows, _ = random_candidates(rng, corpus, len(corpus))
    image_ids = np.array(list(corpus))  # one candidate per image: pycocoevalcap's df is then the corpus's
    scorer = CiderScorer(n=4, sigma=6.0)
    for row, image_id in zip(rows, image_ids):
        scorer += (" ".join(as_words(row)), [" ".join(ref) for ref in corpus[image_id]])
    _, want = scorer.compute_score()
    np.testing.assert_allclose(reward.score(rows, image_ids, EOS), want, rtol=0, atol=1e-9)


def test_a_caption_equal_to_all_its_references_gets_the_maximum():
    rng = random.Random(2)
    corpus = random_corpus(rng)
    caption = ["w3", "w7", "rare2", "w7", "w11", "w2"]
    corpus[1] = [caption] * 5
    reward = CiderD.from_token_lists(corpus, WORDS)
    ids = [WORDS.index(w) for w in caption if w in WORDS]
    exact = np.array([[WORDS.index(w) for w in ["w9", "w3", "w7", "w5", "w7", "w11", "w2", "w1"]]])
    # Each n's clipped cosine is at most 1 and so is the penalty: 10 is the formula's maximum.
    assert reward.score(exact, [1000], EOS)[0] <= 10.0
    corpus[2] = [["w9", "w3", "w7", "w5", "w7", "w11", "w2", "w1"]] * 4
    reward = CiderD.from_token_lists(corpus, WORDS)
    assert reward.score(exact, [2], EOS)[0] == pytest.approx(10.0, abs=1e-12)
    # The out-of-vocabulary reference word cannot be produced: the best a model can do is below 10.
    near = np.array([ids[:2] + [UNK] + ids[2:]])
    assert reward.score(near, [1], EOS)[0] < 10.0
    rows, image_ids = random_candidates(rng, corpus, 200)
    assert reward.score(rows, image_ids, EOS).max() <= 10.0 + 1e-12


def test_unknown_image_ids_are_an_error():
    from capfast.errors import CapfastError

    reward = CiderD.from_token_lists({7: [["w1", "w2"]]}, WORDS)
    with pytest.raises(CapfastError, match="image id 8 has no reference"):
        reward.score(np.array([[5, 2]]), [8], EOS)


def test_bench_reward_agrees_with_its_plain_baseline(capfast_cli):
    result = capfast_cli("bench", "reward", "--images", 300, "--captions", 1280, "--baseline-captions", 200)
    assert result.code == 0, result.stderr
    last = dict(item.split("=") for item in result.stdout.strip().splitlines()[-1].split())
    assert set(last) == {"captions_per_s_per_core", "baseline_captions_per_s_per_core", "ratio",
                         "wall_captions_per_s"}
    assert float(last["captions_per_s_per_core"]) > 0
