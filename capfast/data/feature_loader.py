"""Streams a frozen trunk's cached features (capfast/store/feature_cache.py) as training batches: the second
reader of the data layer, beside the image loader, behind the same order and resume machinery.

Records come in the order capfast/data/order.py plans for the image loader (so N ranks × B/N read what 1 × B
reads, and a resumed epoch skips what it trained on); a batch's features are read from the memory-mapped cache
(the page cache streams them; no process holds the split), its captions from the split's beton. With a cache of
both views, a training sample reads its flipped view when a draw seeded by (seed, epoch, batch) says so, the same
at any world size. Batches are made `prefetch` ahead on a producer thread (capfast/data/producer.py); on CUDA
they are copied from pinned memory on the loader's own stream.
"""

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

from capfast.data import order as orders
from capfast.data.checks import shard as current_shard
from capfast.data.loader import Batch, hand_over
from capfast.data.options import KEY_PREFIX, LoaderOptions
from capfast.data.producer import EpochBatches, Producer
from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.feature_cache import FeatureCache

ORDERS = ("random", "sequential")  # quasi_random shuffles within a beton's pages: it has no meaning here


@dataclass(frozen=True)
class FeatureSettings:
    batch_size: int   # per rank
    train: bool
    device: torch.device
    dtype: torch.dtype
    seed: int
    order: str
    prefetch: int


def build_feature_loader(data_dir, name: str, split: str, options: LoaderOptions, *, train: bool, device="cpu",
                         dtype=torch.float32, seed: int = 0, distributed: bool = False,
                         vocab_size: int | None = None) -> "FeatureLoader":
    """A loader over split `split` of the feature cache `name` in `data_dir`. Of `options`, the batch size (over
    all processes, as for images), order and prefetch apply; the crop and colour options do not (the trunk ran
    before them). Refuses, in one line, a split the cache lacks, holds incompletely or made from other data."""
    from capfast.common.options import validated
    from capfast.data import checks
    from capfast.store.beton import BetonContents, check_token_ids, data_fingerprint

    options = validated(options, KEY_PREFIX)
    if train and options.order not in ORDERS:
        raise CapfastError(f"data.order={options.order} does not apply to a feature cache; use one of "
                           f"{', '.join(ORDERS)}")
    shard = current_shard(distributed)
    beton = schema.beton_path(data_dir, split)
    cache = FeatureCache.open(data_dir, name)
    features = cache.split(split, data_fingerprint(beton))
    settings = FeatureSettings(batch_size=checks.rank_batch_size(options.batch_size, shard.world_size, train),
                               train=bool(train), device=checks.device(device), dtype=checks.dtype(dtype),
                               seed=int(seed), order=options.order if train else "sequential",
                               prefetch=options.prefetch)
    contents = BetonContents(beton)
    if vocab_size is not None:
        check_token_ids(contents, vocab_size)
    return FeatureLoader(cache, features, contents, settings, shard)


class FeatureLoader:
    """Batches of one split's cached features for this rank. len() = batches per epoch; epoch(n) iterates epoch n.
    A Batch's `images` are the trunk's features [B, S, width] in the compute dtype (the model reads them with
    set_reads_trunk_features(True))."""

    yields_images = False

    def __init__(self, cache: FeatureCache, features: np.memmap, contents, settings: FeatureSettings,
                 shard: orders.Shard):
        self.cache, self.features, self.contents = cache, features, contents
        self.settings, self.shard = settings, shard
        self.num_records = len(features)
        if len(contents) != self.num_records:
            raise CapfastError(f"feature cache {cache.path} holds {self.num_records} records, its beton "
                               f"{len(contents)}")
        self.num_samples = orders.records_per_rank(self.num_records, settings.batch_size, shard, settings.train)
        if settings.train and self.num_samples == 0:
            raise CapfastError(f"{cache.path} has {self.num_records} records: fewer than one batch of "
                               f"{settings.batch_size} per rank ({shard.world_size} ranks)")
        self.flips = settings.train and "flip" in cache.views
        self._stream = torch.cuda.Stream(settings.device) if settings.device.type == "cuda" else None

    def __len__(self) -> int:
        return -(-self.num_samples // self.settings.batch_size)

    def rank_order(self, epoch: int) -> np.ndarray:
        s = self.settings
        return orders.rank_order(self.num_records, s.batch_size, self.shard, train=s.train, order=s.order,
                                 seed=s.seed, epoch=epoch)

    def epoch(self, epoch: int, skip_batches: int = 0) -> EpochBatches:
        """The batches of `epoch` from batch `skip_batches` on; close the result when stopping before its end."""
        if int(epoch) < 0 or int(skip_batches) < 0:
            raise CapfastError(f"epoch and skip_batches must be >= 0, got {epoch} and {skip_batches}")
        prepared = functools.partial(self._prepared, int(epoch), int(skip_batches))
        if self.settings.prefetch == 0:
            return EpochBatches(prepared(), self._hand_over)
        return EpochBatches(Producer(prepared, self.settings.prefetch, thread_context=self._device_context,
                                     name=f"capfast-features-{self.shard.rank}"), self._hand_over)

    def _prepared(self, epoch: int, first: int):
        """(Batch, CUDA ready event or None) for each batch from `first` on."""
        size = self.settings.batch_size
        order = self.rank_order(epoch)
        for b in range(first, len(self)):
            yield self._batch(order[b * size:(b + 1) * size], epoch, b)

    def _batch(self, records: np.ndarray, epoch: int, b: int):
        views = self._views(len(records), epoch, b)
        rows = np.sort(records)  # read the file in order; the batch keeps the order's
        stored = np.ascontiguousarray(self.features[rows])
        bfloat16 = self.cache.manifest["dtype"] == "bf16"
        features = torch.from_numpy(stored.view(np.int16) if bfloat16 else stored)
        features = features[torch.from_numpy(np.searchsorted(rows, records)), torch.from_numpy(views)]
        if bfloat16:
            features = features.view(torch.bfloat16)
        labels = (self.contents.captions_of(records), self.contents.ncaptions[records],
                  self.contents.image_ids[records])
        with self._stream_context():
            batch = Batch(self._to_device(features, self.settings.dtype),
                          *(self._to_device(torch.from_numpy(np.asarray(t)), torch.int64) for t in labels))
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        return batch, ready

    def _views(self, n: int, epoch: int, b: int) -> np.ndarray:
        """int64 [n]: which stored view each sample reads (0 = center, 1 = flip)."""
        if not self.flips:
            return np.zeros(n, np.int64)
        generator = np.random.default_rng(orders.batch_seed(self.settings.seed, epoch, b))
        mine = slice(self.shard.rank * n, (self.shard.rank + 1) * n)  # this rank's rows of the global batch
        return generator.integers(0, 2, n * self.shard.world_size)[mine].astype(np.int64)

    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tensor = tensor.to(dtype)
        if self._stream is None:
            return tensor.to(self.settings.device)
        return tensor.pin_memory().to(self.settings.device, non_blocking=True)

    def _hand_over(self, batch: Batch, ready) -> Batch:
        return hand_over(batch, ready, self.settings.device)

    def _device_context(self):
        return torch.cuda.device(self.settings.device) if self._stream is not None else contextlib.nullcontext()

    def _stream_context(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
