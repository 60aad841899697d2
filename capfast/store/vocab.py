"""Word vocabulary: built from training captions, saved as vocab.json, encodes captions to fixed-length ids."""

import collections
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capfast.common.io import atomic_write_text
from capfast.errors import CapfastError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class Vocab:
    words: tuple[str, ...]  # index -> word; the four specials come first

    def __post_init__(self):
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, tokenized_captions, min_count: int = 5) -> "Vocab":
        return cls.from_counts(collections.Counter(t for caption in tokenized_captions for t in caption), min_count)

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_count: int = 5) -> "Vocab":
        """Words seen at least min_count times, most frequent first (ties alphabetical)."""
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(kept))

    def encode(self, tokens: list[str], max_len: int) -> np.ndarray:
        """[bos, w1..wn, eos, pad...] of length max_len + 2; captions longer than max_len are truncated."""
        ids = np.full(max_len + 2, self.pad_id, dtype=np.int32)
        words = [self._index.get(t, self.unk_id) for t in tokens[:max_len]]
        ids[0] = self.bos_id
        ids[1:len(words) + 1] = words
        ids[len(words) + 1] = self.eos_id
        return ids

    def decode(self, ids) -> str:
        """Ids to text, stopping at eos and skipping bos/pad."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)

    def fingerprint(self) -> str:
        import hashlib
        return hashlib.sha1("\n".join(self.words).encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps({"words": list(self.words)}, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            words = tuple(data["words"])
        except FileNotFoundError:
            raise CapfastError(f"vocabulary file not found: {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CapfastError(f"not a capfast vocabulary file: {path} ({e.__class__.__name__})") from None
        if words[:4] != SPECIALS:
            raise CapfastError(f"not a capfast vocabulary file: {path} (specials missing)")
        return cls(words)
