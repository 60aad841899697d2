"""Every random generator a rank draws from (torch, CUDA, numpy, Python), as tensors and plain values, so that
a checkpoint holding them loads with torch.load(weights_only=True) and a resumed rank draws what it would have
drawn (dropout masks above all)."""

import random

import numpy as np
import torch


def state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    saved = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return saved


def restore(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    numpy = saved["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    random.setstate(_as_tuples(saved["python"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _as_tuples(value):
    """random.setstate wants the tuples getstate gave (a round trip through torch.save keeps them, JSON would not)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
