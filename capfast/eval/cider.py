"""CIDEr-D on token ids, fast enough to be a training reward (self-critical sequence training).

The formula is pycocoevalcap's CiderScorer (which is CIDEr-D): n-grams n = 1..4 of PTB-tokenized lowercased text,
tf-idf vectors with idf = log(#images) - log(max(1, df)), per n the cosine of the candidate's and each reference's
vector with the candidate's weights clipped by the reference's (sum min(c, r) * r), a Gaussian length penalty
exp(-delta^2 / (2 * 6^2)), the mean over n, the mean over references, x10. Two things differ from scoring with
pycocoevalcap's Cider on the batch: the document frequencies come from a fixed corpus (the training references,
as self-critical.pytorch's CiderD does), and the text is ids. A candidate scores at most 10: each n's clipped
cosine and the penalty are at most 1 (10 exactly when it equals every reference and has >= 4 words).

Ids: references are mapped word by word to the vocabulary's ids; a word outside the vocabulary (or one spelled
like a special token) gets its own id >= len(vocab), so it still counts in the reference's length, n-grams and
document frequencies but never matches anything a model can emit, <unk> included. An n-gram packs into 64 bits,
16 per token, hence the limit of 65,535 distinct ids.

Scoring runs as one compiled loop per candidate (numba, single-threaded, releases the GIL): its n-grams are
sorted, looked up in the corpus table by binary search and merged with each reference's sorted n-gram list.
"""

import math

import numba
import numpy as np

from capfast.errors import CapfastError

MAX_N = 4
SIGMA = 6.0
BITS_PER_TOKEN = 16
MAX_TOKEN_ID = (1 << BITS_PER_TOKEN) - 1


class CiderD:
    """CIDEr-D of candidates against the references of their images, with a corpus's document frequencies.

    Build it with `from_token_lists` (words) or `from_tables` (the arrays `tables` returns, e.g. from a cache).
    """

    def __init__(self, tables: dict):
        self.tables = tables
        self.image_ids = tables["image_ids"]
        self._image_order = np.argsort(self.image_ids, kind="stable")
        self._sorted_ids = self.image_ids[self._image_order]
        num_images = len(self.image_ids)
        self.log_num_images = math.log(float(max(num_images, 1)))
        self.idf = self.log_num_images - np.log(tables["df"].astype(np.float64))
        self.ref_norm = _reference_norms(tables, self.idf)
        self.buckets = _buckets(tables["keys"])

    @classmethod
    def from_token_lists(cls, references: dict, words: list[str]) -> "CiderD":
        """references: {image_id: [[token, ...] per reference caption]}; words: the vocabulary, index = id."""
        return cls(build_tables(*encode_references(references, words)))

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, image_ids) -> np.ndarray:
        """Row of each image id in the reference table; an error for ids without references."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        at = np.searchsorted(self._sorted_ids, image_ids)
        known = at < len(self._sorted_ids)
        known[known] = self._sorted_ids[at[known]] == image_ids[known]
        if not known.all():
            first = int(image_ids[np.flatnonzero(~known)[0]])
            raise CapfastError(f"image id {first} has no reference captions in the reward's table "
                               f"(references and data must come from the same split)")
        return self._image_order[at]

    def score(self, tokens, image_ids, eos_id: int) -> np.ndarray:
        """tokens [N, T] ids (a row ends at its first eos or at T), image_ids [N] -> CIDEr-D [N] float64."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        lengths = words_before(tokens, eos_id)
        return self.score_rows(tokens, lengths, self.rows(image_ids))

    def score_rows(self, tokens: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The kernel's entry: tokens [N, T] int64 of which the first lengths[i] are words, table rows [N]."""
        words = np.arange(tokens.shape[1]) < lengths[:, None]
        if words.any() and (tokens[words].min() < 1 or tokens[words].max() > MAX_TOKEN_ID):
            raise ValueError(f"candidate token ids must lie in 1..{MAX_TOKEN_ID}")
        t = self.tables
        out = np.empty(len(tokens), dtype=np.float64)
        _score_candidates(tokens, lengths.astype(np.int64), rows.astype(np.int64), t["keys"], self.buckets,
                          self.idf, self.log_num_images, t["ref_ptr"], t["ref_ngram"], t["ref_tf"], self.ref_norm,
                          t["ref_len2"], t["image_ptr"], SIGMA, out)
        return out


def words_before(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Per row, the number of tokens before its first eos (all of them if it has none)."""
    is_eos = tokens == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), tokens.shape[1]).astype(np.int64)


# ---- references -> tables ---------------------------------------------------------------------------------

def encode_references(references: dict, words) -> tuple:
    """{image_id: [[token, ...], ...]} -> (image_ids, ids per reference caption, refs per image). Out-of-vocabulary
    tokens (and tokens spelled like the vocabulary's specials, e.g. a literal "<unk>") get ids from len(words) on."""
    index = {w: i for i, w in enumerate(words) if not (w.startswith("<") and w.endswith(">"))}
    unseen = {}
    image_ids, captions, counts = [], [], []
    for image_id, refs in references.items():
        image_ids.append(int(image_id))
        counts.append(len(refs))
        for tokens in refs:
            captions.append([index[t] if t in index else unseen.setdefault(t, len(words) + len(unseen))
                             for t in tokens])
    if len(words) + len(unseen) - 1 > MAX_TOKEN_ID:
        raise CapfastError(f"the references hold {len(words) + len(unseen):,} distinct words (vocabulary plus "
                           f"unknown words): more than the {MAX_TOKEN_ID:,} the CIDEr-D reward can pack")
    return np.asarray(image_ids, dtype=np.int64), captions, np.asarray(counts, dtype=np.int64)


def build_tables(image_ids: np.ndarray, captions: list, refs_per_image: np.ndarray) -> dict:
    """The corpus as sorted arrays: every distinct n-gram (`keys`) with its document frequency (`df`: images whose
    references contain it), and per reference caption its distinct n-grams (indices into `keys`, ascending) with
    their counts, in CSR form (`ref_ptr`); `ref_len2` is pycocoevalcap's "length", a count of bigrams (the
    penalty's delta equals the difference in words wherever the score is not 0 anyway)."""
    lengths = np.fromiter(map(len, captions), dtype=np.int64, count=len(captions))
    flat = np.fromiter((t for c in captions for t in c), dtype=np.uint64, count=int(lengths.sum()))
    keys, caption_of_key = _all_ngrams(flat, lengths)
    unique_keys, ngram = _unique_with_inverse(keys)
    num_ngrams = max(len(unique_keys), 1)
    image_of_caption = np.repeat(np.arange(len(image_ids)), refs_per_image)
    in_image, _ = _unique_with_counts(image_of_caption[caption_of_key] * num_ngrams + ngram)
    df = np.bincount(in_image % num_ngrams, minlength=len(unique_keys)).astype(np.int32)
    per_caption, tf = _unique_with_counts(caption_of_key * num_ngrams + ngram)
    ref_of_entry = per_caption // num_ngrams
    return {
        "image_ids": image_ids,
        "image_ptr": np.concatenate([[0], np.cumsum(refs_per_image)]).astype(np.int64),
        "keys": unique_keys,
        "df": df,
        "ref_ptr": np.concatenate([[0], np.cumsum(np.bincount(ref_of_entry, minlength=len(captions)))]),
        "ref_ngram": (per_caption % num_ngrams).astype(np.int32),
        "ref_tf": tf.astype(np.int32),
        "ref_len2": np.maximum(lengths - 1, 0).astype(np.int32),
    }


def _unique_with_counts(values: np.ndarray):
    """np.unique(values, return_counts=True) by sorting (numpy's hash-based unique is slow on big int arrays)."""
    values = np.sort(values)
    first = np.ones(len(values), dtype=bool)
    np.not_equal(values[1:], values[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return values[starts], np.diff(np.append(starts, len(values)))


def _unique_with_inverse(values: np.ndarray):
    """np.unique(values, return_inverse=True), by sorting."""
    order = np.argsort(values)
    ordered = values[order]
    first = np.ones(len(values), dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def _all_ngrams(flat: np.ndarray, lengths: np.ndarray):
    """Keys of all 1..4-grams of the captions concatenated in `flat`, with the caption each comes from."""
    caption = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padded = np.concatenate([flat, np.zeros(MAX_N, dtype=np.uint64)])
    keys, owners = [], []
    key = np.zeros(len(flat), dtype=np.uint64)
    for n in range(1, MAX_N + 1):
        key |= padded[n - 1:n - 1 + len(flat)] << np.uint64(BITS_PER_TOKEN * (n - 1))
        fits = position + n <= lengths[caption]
        keys.append(key[fits])
        owners.append(caption[fits])
    return np.concatenate(keys), np.concatenate(owners)


def ngram_order(keys: np.ndarray) -> np.ndarray:
    """n of each key: ids are >= 1, so the count of non-zero 16-bit fields."""
    order = np.ones(len(keys), dtype=np.int64)
    for n in range(1, MAX_N):
        order += (keys >> np.uint64(BITS_PER_TOKEN * n)) != 0
    return order


def _buckets(keys: np.ndarray) -> np.ndarray:
    """[4, 65537]: keys of n-grams of order n + 1 whose last token is t lie in keys[b[n, t]:b[n, t + 1]] (the
    sorted keys group by order, since ids are >= 1, and within an order by the last token, the top 16 bits)."""
    tops = np.arange(MAX_TOKEN_ID + 2, dtype=np.uint64)
    buckets = np.empty((MAX_N, len(tops)), dtype=np.int64)
    for n in range(MAX_N):
        buckets[n] = np.searchsorted(keys, tops << np.uint64(BITS_PER_TOKEN * n))
        if n == MAX_N - 1:  # (MAX_TOKEN_ID + 1) << 48 wraps around to 0
            buckets[n, -1] = len(keys)
    return buckets


def _reference_norms(tables: dict, idf: np.ndarray) -> np.ndarray:
    """[refs, 4]: per reference caption and n, the L2 norm of its tf-idf vector."""
    num_refs = len(tables["ref_len2"])
    ngram = tables["ref_ngram"]
    ref = np.repeat(np.arange(num_refs), np.diff(tables["ref_ptr"]))
    weight = tables["ref_tf"] * idf[ngram]
    order = ngram_order(tables["keys"])[ngram] - 1
    squares = np.bincount(ref * MAX_N + order, weights=weight * weight, minlength=num_refs * MAX_N)
    return np.sqrt(squares).reshape(num_refs, MAX_N)


# ---- the kernel -------------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _score_candidates(tokens, lengths, rows, keys, buckets, idf, log_num_images, ref_ptr, ref_ngram, ref_tf, ref_norm,
                      ref_len2, image_ptr, sigma, out):
    grams = np.empty(MAX_N * tokens.shape[1], dtype=np.uint64)
    hyp_ngram = np.empty(grams.shape[0], dtype=np.int64)   # corpus index of each distinct n-gram found there
    hyp_weight = np.empty(grams.shape[0], dtype=np.float64)
    hyp_order = np.empty(grams.shape[0], dtype=np.int64)
    norm = np.empty(MAX_N)
    val = np.empty(MAX_N)
    total = np.empty(MAX_N)
    for s in range(tokens.shape[0]):
        length = lengths[s]
        m = 0
        for n in range(1, MAX_N + 1):
            for p in range(length - n + 1):
                key = np.uint64(0)
                for j in range(n):
                    key |= np.uint64(tokens[s, p + j]) << np.uint64(BITS_PER_TOKEN * j)
                grams[m] = key
                m += 1
        sorted_grams = grams[:m]
        sorted_grams.sort()
        norm[:] = 0.0
        found = 0
        i = 0
        while i < m:  # distinct n-grams in key order, i.e. in corpus-index order
            key = sorted_grams[i]
            tf = 1
            while i + tf < m and sorted_grams[i + tf] == key:
                tf += 1
            i += tf
            order = 0
            while order < MAX_N - 1 and (key >> np.uint64(BITS_PER_TOKEN * (order + 1))) != np.uint64(0):
                order += 1
            top = key >> np.uint64(BITS_PER_TOKEN * order)
            lo, hi = buckets[order, top], buckets[order, top + np.uint64(1)]
            end = hi
            while lo < hi:  # binary search for the first key >= this one
                mid = (lo + hi) >> 1
                if keys[mid] < key:
                    lo = mid + 1
                else:
                    hi = mid
            at = lo
            in_corpus = at < end and keys[at] == key
            weight = tf * (idf[at] if in_corpus else log_num_images)
            norm[order] += weight * weight
            if in_corpus:
                hyp_ngram[found] = at
                hyp_weight[found] = weight
                hyp_order[found] = order
                found += 1
        for n in range(MAX_N):
            norm[n] = math.sqrt(norm[n])
        length2 = max(length - 1, 0)
        row = rows[s]
        total[:] = 0.0
        for r in range(image_ptr[row], image_ptr[row + 1]):
            val[:] = 0.0
            a, b, b_end = 0, ref_ptr[r], ref_ptr[r + 1]
            while a < found and b < b_end:  # merge two ascending lists of corpus indices
                if hyp_ngram[a] == ref_ngram[b]:
                    ref_weight = ref_tf[b] * idf[ref_ngram[b]]
                    val[hyp_order[a]] += min(hyp_weight[a], ref_weight) * ref_weight
                    a += 1
                    b += 1
                elif hyp_ngram[a] < ref_ngram[b]:
                    a += 1
                else:
                    b += 1
            delta = float(length2 - ref_len2[r])
            penalty = math.exp(-(delta * delta) / (2.0 * sigma * sigma))
            for n in range(MAX_N):
                if norm[n] != 0.0 and ref_norm[r, n] != 0.0:
                    val[n] /= norm[n] * ref_norm[r, n]
                total[n] += val[n] * penalty
        num_refs = image_ptr[row + 1] - image_ptr[row]
        out[s] = 0.0 if num_refs == 0 else total.mean() / num_refs * 10.0
