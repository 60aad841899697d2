"""Streams a capfast beton as normalized, augmented image batches on the training device.

ffcv reads records on its own thread. A producer thread per epoch (capfast/data/producer.py) turns them into
batches `prefetch` ahead of the consumer: on CUDA it hands the stored JPEG bytes to nvJPEG and runs the
crop/jitter/normalize batched on the loader's own stream, recording an event per batch that the consumer's stream
waits on. Without CUDA, each image is decoded (libjpeg-turbo), cropped, resized, jittered and normalized inside
ffcv's parallel stage, on the loader's `workers` threads (ffcv_ops.CropResizeDecoder), and the producer only
wraps the finished arrays. prefetch=0 does the producer's work on the consumer's thread. Crops are drawn from a
generator seeded by (seed, epoch, batch, rank), so every path, and a run resumed with skip_batches, sees the same
batches. With data.verify the producer checks each record of a batch against its checksum (schema.record_checksum)
before the batch is used: on CUDA the bytes it hands to nvJPEG, on the CPU a copy of the bytes the stage decoded.
"""

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from capfast.common.normalization import Normalization
from capfast.common.options import validated
from capfast.data import augment, checks
from capfast.data import order as orders
from capfast.data.augment import preprocess_images  # noqa: F401  (part of this module's API)
from capfast.data.checks import COMPUTE_DTYPES, resolve_workers  # noqa: F401  (part of this module's API)
from capfast.data.options import KEY_PREFIX, LoaderOptions
from capfast.data.producer import EpochBatches, Producer
from capfast.errors import CapfastError
from capfast.store import schema

IMAGE_INFO = "image_info"  # (height, width, nbytes) of each image: an extra ffcv output read from `image`
JPEG_BYTES = "jpeg_bytes"  # the CPU path's stored JPEG bytes, packed, when data.verify checks them
# Held while a batch's CUDA work is enqueued: see _cuda_batch for the nvJPEG output-memory hazard it guards.
_CUDA_ENQUEUE = threading.Lock()


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] normalized, channels_last, compute dtype, on device
    captions: torch.Tensor  # [B, K, L] int64 token ids
    ncaptions: torch.Tensor  # [B] int64: how many rows of `captions` are real
    image_ids: torch.Tensor  # [B] int64

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def hand_over(batch: Batch, ready, device) -> Batch:
    """In the consumer's thread: its stream waits for the batch's work, `ready` (an event; None: nothing to wait
    for), with no host block."""
    if ready is None:
        return batch
    consumer = torch.cuda.current_stream(device)
    consumer.wait_event(ready)
    for tensor in batch.tensors():
        tensor.record_stream(consumer)  # the allocator must not recycle it while the consumer still reads it
    return batch


@dataclass(frozen=True)
class LoaderSettings:
    """What one rank's loader does: the user's LoaderOptions resolved for this rank and run."""

    batch_size: int  # this rank's share of the options' batch
    train: bool
    device: torch.device
    dtype: torch.dtype
    image_size: int
    workers: int
    seed: int
    order: str
    os_cache: bool
    crop_scale: tuple
    crop_ratio: tuple
    color_jitter: float
    # "stage": each JPEG decoded with its crop and resize in ffcv's parallel stage (the CPU path); "batched": the
    # stored bytes of a batch go to one decode_jpegs call (nvJPEG on CUDA; torchvision on the CPU, for tests)
    decode: str
    normalization: Normalization  # the encoder's input normalization
    prefetch: int  # batches a producer thread prepares ahead; 0: prepared on the consumer's
    verify: bool  # each record checked against its checksum as it is read


def build_loader(beton, options: LoaderOptions, *, train: bool, device="cpu", dtype=torch.float32, seed: int = 0,
                 distributed: bool = False, normalization: Normalization,
                 vocab_size: int | None = None) -> "CaptionLoader":
    """A loader over `beton` (written by `capfast convert`); `options` are checked by their rules first.
    train=True: seeded shuffled order that changes every epoch, full batches only, random resized crops (+ optional
    colour jitter); options.batch_size must split evenly over the processes. train=False: file order, every record
    exactly once (over all ranks when distributed), each whole image resized to image_size, ceil(batch_size /
    processes) per rank; order, crops and jitter do not apply. seed: the run's (TrainConfig checks it).
    normalization: the encoder's (models.Captioner.preprocessing), on both the CPU stage and the GPU path; no
    default, since a wrong one trains without an error. vocab_size: every caption token id must be below it
    (checked once, here: a one-line error naming the record, not an IndexError at step 1)."""
    options = validated(options, KEY_PREFIX)
    device = checks.device(device)
    shard = checks.shard(distributed)
    settings = LoaderSettings(
        batch_size=checks.rank_batch_size(options.batch_size, shard.world_size, train), train=bool(train),
        device=device, dtype=checks.dtype(dtype), image_size=options.image_size,
        workers=resolve_workers(options.workers), seed=int(seed), order=options.order if train else "sequential",
        os_cache=options.os_cache, crop_scale=options.crop_scale, crop_ratio=options.crop_ratio,
        color_jitter=options.color_jitter if train else 0.0, decode="batched" if device.type == "cuda" else "stage",
        normalization=normalization, prefetch=options.prefetch, verify=options.verify)
    loader = CaptionLoader(beton, settings, shard)
    if vocab_size is not None:
        from capfast.store.beton import BetonContents, check_token_ids

        check_token_ids(BetonContents(beton), vocab_size)
    return loader


class CaptionLoader:
    """Batches of one beton for this rank. len() = batches per epoch; epoch(n) iterates epoch n."""

    yields_images = True  # (capfast.data.feature_loader's batches hold a trunk's features instead)

    def __init__(self, beton, settings: LoaderSettings, shard: orders.Shard):
        from capfast.common.runtime import prepare_process
        from capfast.store.beton import check_beton

        prepare_process()
        self.beton = str(beton)
        self.settings = settings
        self.shard = shard
        reader = check_beton(beton)
        if settings.verify and schema.CHECKSUM not in reader.field_names:
            raise CapfastError(f"{self.beton} has no record checksums (converted before capfast stored them), so "
                               f"{KEY_PREFIX}verify cannot check it: convert it again or set {KEY_PREFIX}verify=false")
        self.num_records = int(reader.num_samples)
        self.max_jpeg_bytes = checks.check_images(reader, self.beton)
        self.num_samples = self._records_per_rank()
        if settings.train and self.num_samples == 0:
            raise CapfastError(f"{self.beton} has {self.num_records} records: fewer than one batch of "
                               f"{settings.batch_size} per rank ({shard.world_size} ranks)")
        self._ffcv = self._ffcv_loader()
        self._quasi = self._quasi_order() if settings.train and settings.order == "quasi_random" else None
        self._stream = torch.cuda.Stream(settings.device) if self.on_cuda else None
        self._scratch = threading.local()  # per-thread buffers: two epochs may be produced at once

    @property
    def on_cuda(self) -> bool:
        return self.settings.device.type == "cuda"

    def __len__(self) -> int:
        return -(-self.num_samples // self.settings.batch_size)

    def _records_per_rank(self) -> int:
        return orders.records_per_rank(self.num_records, self.settings.batch_size, self.shard, self.settings.train)

    # ---- order ----------------------------------------------------------------------------------------

    def rank_order(self, epoch: int) -> np.ndarray:
        """Record indices this rank reads in `epoch`, in order (a pure function of seed, epoch and rank)."""
        s = self.settings
        return orders.rank_order(self.num_records, s.batch_size, self.shard, train=s.train, order=s.order,
                                 seed=s.seed, epoch=epoch, quasi=self._quasi)

    # ---- iteration ------------------------------------------------------------------------------------

    def epoch(self, epoch: int, skip_batches: int = 0) -> EpochBatches:
        """The batches of `epoch`, starting at batch `skip_batches` (skipped batches are not read or decoded).
        The producer starts at once; close the result (or use it in `with`) when stopping before its end."""
        if int(epoch) < 0 or int(skip_batches) < 0:
            raise CapfastError(f"epoch and skip_batches must be >= 0, got {epoch} and {skip_batches}")
        indices = self.rank_order(int(epoch))[int(skip_batches) * self.settings.batch_size:]
        if len(indices) == 0:
            return EpochBatches(iter(()), self._hand_over)
        prepared = functools.partial(self._prepared, indices, int(epoch), int(skip_batches))
        if self.settings.prefetch == 0:
            return EpochBatches(_one_ahead(prepared()) if self.on_cuda else prepared(), self._hand_over)
        producer = Producer(prepared, self.settings.prefetch, thread_context=self._device_context,
                            name=f"capfast-producer-{self.shard.rank}")
        return EpochBatches(producer, self._hand_over)

    def _prepared(self, indices: np.ndarray, epoch: int, first: int) -> Iterator[tuple]:
        """(Batch, CUDA ready event or None) for each batch: on the producer thread, or the consumer's when
        prefetch=0. Batch b's records are done with before batch b+1 is read: ffcv reuses its buffers."""
        raw_batches = self._read(indices, epoch, first)
        try:
            for b, raw in enumerate(raw_batches, start=first):
                yield self._cuda_batch(raw, epoch, b) if self.on_cuda else (self._cpu_batch(raw, epoch, b), None)
        finally:
            raw_batches.close()

    def _read(self, indices: np.ndarray, epoch: int, first: int):
        from ffcv.pipeline.compiler import Compiler

        from capfast.data.ffcv_ops import GuardedEpochIterator

        # ffcv's iterator records CUDA events on the stream current here and makes its own streams wait on them:
        # the loader's stream keeps that bookkeeping away from the training stream.
        with self._stream_context(), torch_threads_kept():
            Compiler.set_num_threads(self.settings.workers)
            return GuardedEpochIterator(self._ffcv, indices, batch_memory=self._stage_memory(epoch, first))

    def _stage_memory(self, epoch: int, first: int) -> dict:
        """CPU: CropResizeDecoder's memory for each batch of this iterator (boxes drawn as on the GPU path)."""
        if self.settings.decode != "stage":
            return {}
        decoder = self._ffcv.pipeline_specs[schema.IMAGE].decoder
        # batches alive at once: ffcv's slots, the producer's queue, the one it is putting, the consumer's last two
        alive = self._ffcv.batches_ahead + 2 + self.settings.prefetch + 3
        buffers = decoder.epoch_buffers(self.settings.batch_size, alive)

        def memory_for(b: int, records: np.ndarray) -> tuple:
            boxes, factors = self._augmentation(torch.from_numpy(decoder.sizes(records)), epoch, first + b)
            return decoder.batch_memory(boxes.numpy(), None if factors is None else factors.numpy(), buffers)

        return {decoder: memory_for}

    def _hand_over(self, batch: Batch, ready) -> Batch:
        return hand_over(batch, ready, self.settings.device)

    # ---- one batch ------------------------------------------------------------------------------------

    def _augmentation(self, sizes: torch.Tensor, epoch: int, batch: int):
        """(crop boxes, colour jitter factors or None) for one batch."""
        s = self.settings
        if not s.train:
            return augment.full_boxes(sizes), None
        generator = torch.Generator().manual_seed(orders.batch_seed(s.seed, epoch, batch))
        n, world = len(sizes), self.shard.world_size
        mine = slice(self.shard.rank * n, (self.shard.rank + 1) * n)
        # Draw for the whole global batch, keep this rank's rows: a sample crops the same at any world size.
        # Each row's box depends only on its own draws and size, so the other ranks' sizes need not be known.
        boxes = augment.random_crop_boxes(sizes.repeat(world, 1), s.crop_scale, s.crop_ratio, generator)[mine]
        factors = None
        if s.color_jitter > 0:
            factors = augment.jitter_factors(n * world, s.color_jitter, generator)[mine]
        return boxes, factors

    def _finish_images(self, images_u8: torch.Tensor, boxes, factors) -> torch.Tensor:
        x = augment.resize_crops(images_u8, boxes, self.settings.image_size, self._resize_buffer(len(boxes)))
        if factors is not None:
            x = augment.color_jitter(x.float(), factors)
        return augment.normalize(x, self.settings.dtype, self.settings.normalization)

    def _resize_buffer(self, n: int):
        """Reused uint8 resize output on the CPU: fresh large allocations page-fault on every batch."""
        if self.on_cuda:
            return None
        size = self.settings.image_size
        resized = getattr(self._scratch, "resized", None)
        if resized is None or len(resized) < n:
            resized = self._scratch.resized = torch.empty((n, 3, size, size), dtype=torch.uint8,
                                                          memory_format=torch.channels_last)
        return resized[:n]

    def _verify(self, out: dict, epoch: int, b: int) -> None:
        """data.verify: a one-line error naming the first record of the batch that does not match its checksum."""
        from capfast.store.verify import mismatch_error, record_mismatches

        info = out[IMAGE_INFO].numpy()
        ends = np.cumsum(info[:, 2])
        packed = memoryview(out[JPEG_BYTES if self.settings.decode == "stage" else schema.IMAGE].numpy().reshape(-1))
        jpegs = [packed[end - size:end] for end, size in zip(ends.tolist(), info[:, 2].tolist())]
        values = np.stack([info[:, 0], info[:, 1], *(out[name].numpy().reshape(-1) for name in
                                                     (schema.NCAPTIONS, schema.IMAGE_ID, schema.CHECKSUM))], axis=1)
        bad = record_mismatches(jpegs, out[schema.CAPTIONS].numpy(), values)
        if bad:
            raise mismatch_error(self.beton, self._record(epoch, b, bad[0]), int(values[bad[0], 3]))

    def _record(self, epoch: int, b: int, i: int) -> int:
        """The record index of position i of batch b of `epoch`."""
        return int(self.rank_order(epoch)[b * self.settings.batch_size + i])

    def _cpu_batch(self, raw, epoch: int, b: int) -> Batch:
        out = dict(zip(self._ffcv.pipeline_specs, raw))
        if self.settings.verify:
            self._verify(out, epoch, b)
        if self.settings.decode == "stage":  # cropped, resized and normalized in ffcv's stage already
            from capfast.data.ffcv_ops import undecodable

            failed = undecodable(out[schema.IMAGE])
            if len(failed):
                raise self._undecodable(epoch, b, int(failed[0]), out, "libjpeg-turbo could not decode it")
            return Batch(self._stage_images(out[schema.IMAGE]), *self._labels(out))
        boxes, factors = self._augmentation(out[IMAGE_INFO][:, :2].clone(), epoch, b)
        with single_torch_thread():
            images = self._images(out, boxes, factors, epoch, b)
        return Batch(images, *self._labels(out))

    def _undecodable(self, epoch: int, b: int, i: int | None, out: dict, why: str) -> CapfastError:
        """The error for a batch that does not decode, naming its record `i` (None: no single JPEG is at fault)."""
        if i is None:
            return CapfastError(f"{self.beton}: batch {b} of epoch {epoch} does not decode on "
                               f"{self.settings.device} ({why}), though each of its JPEGs decodes on the CPU")
        record = self._record(epoch, b, i)
        image_id = int(out[schema.IMAGE_ID].view(-1)[i])
        return CapfastError(f"{self.beton}: record {record} (image {image_id}) is not a valid JPEG: {why}; "
                           f"convert the split again")

    def _stage_images(self, images: torch.Tensor) -> torch.Tensor:
        """CropResizeDecoder's [B, S, S, 3] output as the model's [B, 3, S, S] channels_last input."""
        dtype = self.settings.dtype
        if dtype == torch.bfloat16:
            images = images.view(torch.bfloat16)
        images = images.permute(0, 3, 1, 2)
        return images.to(dtype) if images.dtype != dtype else images  # float16: computed as float32

    def _cuda_batch(self, raw, epoch: int, b: int):
        """Decodes and transforms one batch on the loader's stream; returns (Batch, its ready event).

        nvJPEG writes into its freshly allocated outputs when decode is called, not in stream order (see
        decode_jpegs). The allocator hands out blocks last used on the allocating stream, here the loader's, so
        no work on that stream may still be queued when decode is called: _wait_idle first, under a process-wide
        lock so that no other producer (another epoch, another loader whose pooled stream may be the same CUDA
        stream) queues work in between. The consumer's stream reads the batch after the ready event, and
        record_stream in _hand_over keeps the allocator from recycling the batch's blocks before that stream's
        work on them has finished: such a block becomes free only once the consumer's work is really done, so
        an immediate nvJPEG write into it is safe too.
        """
        out = dict(zip(self._ffcv.pipeline_specs, raw))
        if self.settings.verify:
            self._verify(out, epoch, b)  # before nvJPEG sees the bytes
        boxes, factors = self._augmentation(out[IMAGE_INFO][:, :2].clone(), epoch, b)
        with _CUDA_ENQUEUE, self._stream_context():
            _wait_idle(self._stream)
            images = self._images(out, boxes, factors, epoch, b)  # the decode first, while the stream is idle
            labels = self._labels(out)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return Batch(images, *labels), ready

    def _images(self, out: dict, boxes, factors, epoch: int, b: int) -> torch.Tensor:
        """The batch's model input from the JPEG bytes (nvJPEG on CUDA)."""
        return self._finish_images(self._decoded_jpegs(out, epoch, b), boxes, factors)

    def _decoded_jpegs(self, out: dict, epoch: int, b: int) -> torch.Tensor:
        """uint8 [B, 3, H_max, W_max]: one decode_jpegs call on the batch's JPEGs, which JpegBytesDecoder stored
        back to back, so one torch.split cuts them apart."""
        from capfast.data.jpeg import decode_jpegs, first_undecodable

        info = out[IMAGE_INFO]
        nbytes = info[:, 2]
        packed = out[schema.IMAGE].view(-1)[:int(nbytes.sum())]
        jpegs = list(torch.split(packed, nbytes.tolist()))
        try:
            decoded = decode_jpegs(jpegs, self.settings.device)
        except RuntimeError as error:  # nvJPEG and torchvision raise for the whole batch
            raise self._undecodable(epoch, b, first_undecodable(jpegs), out, str(error).splitlines()[0]) from None
        sizes = info[:, :2]
        if bool((sizes == sizes[0]).all()):
            return torch.stack(decoded)
        return augment.pad_images(decoded)

    def _labels(self, out: dict) -> tuple:
        """captions, ncaptions, image_ids as int64 copies on the device (ffcv reuses its buffers). To CUDA through
        pinned memory: no host sync, and no wait for the stream's queued work."""
        device = self.settings.device

        def owned(t):
            return augment.to_device(t.to(dtype=torch.int64, copy=True), device)

        return owned(out[schema.CAPTIONS]), owned(out[schema.NCAPTIONS].view(-1)), owned(out[schema.IMAGE_ID].view(-1))

    # ---- ffcv setup -----------------------------------------------------------------------------------

    def _device_context(self):
        # ffcv creates CUDA streams on the current device, and a new thread starts on cuda:0: make it ours
        return torch.cuda.device(self.settings.device) if self.on_cuda else contextlib.nullcontext()

    def _stream_context(self):
        return torch.cuda.stream(self._stream) if self.on_cuda else contextlib.nullcontext()

    def _ffcv_loader(self):
        from ffcv.loader import Loader, OrderOption

        s = self.settings
        with self._device_context(), torch_threads_kept():
            # drop_last/order/distributed stay off: capfast plans each rank's epoch order itself
            return Loader(self.beton, batch_size=s.batch_size, num_workers=s.workers, os_cache=s.os_cache,
                          order=OrderOption.SEQUENTIAL, seed=s.seed, drop_last=False,
                          pipelines=self._pipelines())

    def _pipelines(self) -> dict:
        """Built fresh for every ffcv Loader: ffcv mutates the lists it is given."""
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        from capfast.data.ffcv_ops import ImageInfoDecoder, JpegBytesDecoder

        specs = {
            schema.CAPTIONS: PipelineSpec(schema.CAPTIONS, decoder=NDArrayDecoder(), transforms=[ToTensor()]),
            schema.NCAPTIONS: PipelineSpec(schema.NCAPTIONS, decoder=IntDecoder(), transforms=[ToTensor()]),
            schema.IMAGE_ID: PipelineSpec(schema.IMAGE_ID, decoder=IntDecoder(), transforms=[ToTensor()]),
            # None: ffcv skips the field (a format 1 beton has none)
            schema.CHECKSUM: PipelineSpec(schema.CHECKSUM, decoder=IntDecoder(), transforms=[ToTensor()])
            if self.settings.verify else None,
        }
        image_info = {IMAGE_INFO: PipelineSpec(schema.IMAGE, decoder=ImageInfoDecoder(), transforms=[ToTensor()])}
        jpeg_bytes = PipelineSpec(schema.IMAGE, decoder=JpegBytesDecoder(self.max_jpeg_bytes), transforms=[ToTensor()])
        if self.settings.decode == "stage":  # the stage reads each image's size from the metadata itself
            checked = {JPEG_BYTES: jpeg_bytes, **image_info} if self.settings.verify else {}
            return {schema.IMAGE: PipelineSpec(schema.IMAGE, decoder=self._crop_resize_decoder(),
                                               transforms=[ToTensor()]), **specs, **checked}
        return {schema.IMAGE: jpeg_bytes, **specs, **image_info}

    def _crop_resize_decoder(self):
        from capfast.data.ffcv_ops import CropResizeDecoder

        c = augment.constants(torch.device("cpu"), self.settings.normalization)
        out_dtype = np.int16 if self.settings.dtype == torch.bfloat16 else np.float32  # bfloat16 travels as bits
        return CropResizeDecoder(self.settings.image_size, out_dtype, c["mean"].view(3).numpy(),
                                 c["inv_std"].view(3).numpy())

    def _quasi_order(self):
        from ffcv.traversal_order import QuasiRandom

        # ffcv's page-local shuffle of the whole split; capfast shards it per rank itself (ffcv refuses to)
        return QuasiRandom(self._ffcv)


def _one_ahead(items: Iterator) -> Iterator:
    """Each item once the next has been computed: on CUDA without a producer, batch n+1's work is queued on the
    loader's stream before batch n is handed to the consumer."""
    try:
        pending = next(items, None)
        for item in items:
            yield pending
            pending = item
        if pending is not None:
            yield pending
    finally:
        items.close()


def _wait_idle(stream) -> None:
    """Blocks this thread until `stream` has run everything queued on it. Through an event rather than
    stream.synchronize(): the same wait, but not reported by torch.cuda.set_sync_debug_mode, which is
    process-wide and is there to catch syncs on the training thread, not this deliberate one on the producer."""
    idle = torch.cuda.Event()
    idle.record(stream)
    idle.synchronize()


@contextlib.contextmanager
def single_torch_thread():
    """ffcv's decode threads already keep the cores busy; torch's intra-op threads competing with them for small
    per-image ops made the CPU loader ~10x slower (measured on 2 cores)."""
    with torch_threads_kept():
        torch.set_num_threads(1)
        yield


@contextlib.contextmanager
def torch_threads_kept():
    """Restores torch's intra-op thread count afterwards (ffcv's Compiler.set_num_threads also sets it)."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
