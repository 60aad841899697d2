"""Streams a capfast beton as normalized, augmented image batches on the training device.

ffcv reads records on its own thread. On CUDA it hands out the stored JPEG bytes, nvJPEG decodes them and the
crop/jitter/normalize run batched on a side stream, one batch ahead of the consumer. Without CUDA, each image is
decoded (libjpeg-turbo), cropped, resized, jittered and normalized inside ffcv's parallel stage, on all of the
loader's threads (ffcv_ops.CropResizeDecoder). Crops are drawn from a generator seeded by (seed, epoch, batch,
rank), on either device, so a run resumed with skip_batches sees the same batches.
"""

import contextlib
import os
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from capfast import schema
from capfast.data import augment, order as orders
from capfast.data.augment import preprocess_images  # noqa: F401  (part of this module's API)
from capfast.errors import CapfastError

IMAGE_INFO = "image_info"  # (height, width, nbytes) of each image: an extra ffcv output read from `image`
JPG_MODE = 0  # ffcv RGBImageField mode of JPEG-compressed records
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] normalized, channels_last, compute dtype, on device
    captions: torch.Tensor  # [B, K, L] int64 token ids
    ncaptions: torch.Tensor  # [B] int64: how many rows of `captions` are real
    image_ids: torch.Tensor  # [B] int64

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
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
    decoder: str  # "ffcv": libjpeg-turbo on ffcv's threads (CPU); "bytes": decode_jpegs (nvJPEG on CUDA)


def build_loader(beton, *, batch_size, train: bool, device="cpu", dtype=torch.float32, image_size=224,
                 num_workers=None, seed=0, distributed=False, order="random", os_cache=True,
                 crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3), color_jitter=0.0) -> "CaptionLoader":
    """A loader over `beton` (written by `capfast convert`). train=True: seeded shuffled order that changes every
    epoch, full batches only, random resized crops (+ optional colour jitter). train=False: file order, every
    record exactly once (over all ranks when distributed), each whole image resized to image_size."""
    device = _device(device)
    settings = LoaderSettings(
        batch_size=_positive_int(batch_size, "batch size"), train=bool(train), device=device, dtype=_dtype(dtype),
        image_size=_positive_int(image_size, "image size"), workers=resolve_workers(num_workers), seed=_seed(seed),
        order=_order(order), os_cache=bool(os_cache), crop_scale=_range(crop_scale, "crop scale", 1.0),
        crop_ratio=_range(crop_ratio, "crop ratio", None), color_jitter=_jitter(color_jitter),
        decoder="bytes" if device.type == "cuda" else "ffcv")
    return CaptionLoader(beton, settings, _shard(distributed))


class CaptionLoader:
    """Batches of one beton for this rank. len() = batches per epoch; epoch(n) iterates epoch n."""

    def __init__(self, beton, settings: LoaderSettings, shard: orders.Shard):
        from capfast.inspect_beton import check_beton

        self.beton = str(beton)
        self.settings = settings
        self.shard = shard
        reader = check_beton(beton)
        self.num_records = int(reader.num_samples)
        self.max_jpeg_bytes = _check_images(reader, self.beton)
        self.num_samples = self._records_per_rank()
        if settings.train and self.num_samples == 0:
            raise CapfastError(f"{self.beton} has {self.num_records} records: fewer than one batch of "
                               f"{settings.batch_size} per rank ({shard.world_size} ranks)")
        self._ffcv = self._ffcv_loader()
        self._quasi = self._quasi_order() if settings.train and settings.order == "quasi_random" else None
        self._stream = torch.cuda.Stream(settings.device) if self.on_cuda else None
        self._resized = None

    @property
    def on_cuda(self) -> bool:
        return self.settings.device.type == "cuda"

    def __len__(self) -> int:
        return -(-self.num_samples // self.settings.batch_size)

    def _records_per_rank(self) -> int:
        s = self.settings
        if s.train:
            return orders.train_batches_per_rank(self.num_records, s.batch_size, self.shard) * s.batch_size
        return len(orders.eval_indices(self.num_records, self.shard))

    # ---- order ----------------------------------------------------------------------------------------

    def rank_order(self, epoch: int) -> np.ndarray:
        """Record indices this rank reads in `epoch`, in order (a pure function of seed, epoch and rank)."""
        s = self.settings
        if not s.train:
            return orders.eval_indices(self.num_records, self.shard)
        if s.order == "quasi_random":
            epoch_order = orders.quasi_random_epoch_order(self._quasi, s.seed, epoch, s.batch_size)
        elif s.order == "random":
            epoch_order = orders.random_epoch_order(self.num_records, s.seed, epoch)
        else:
            epoch_order = orders.sequential_epoch_order(self.num_records)
        return orders.train_order(epoch_order, s.batch_size, self.shard)

    # ---- iteration ------------------------------------------------------------------------------------

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, starting at batch `skip_batches` (skipped batches are not read or decoded)."""
        if int(epoch) < 0 or int(skip_batches) < 0:
            raise CapfastError(f"epoch and skip_batches must be >= 0, got {epoch} and {skip_batches}")
        indices = self.rank_order(int(epoch))[int(skip_batches) * self.settings.batch_size:]
        return self._batches(indices, int(epoch), int(skip_batches))

    def _batches(self, indices: np.ndarray, epoch: int, first: int) -> Iterator[Batch]:
        if len(indices) == 0:
            return
        raw_batches = self._read(indices, epoch, first)
        try:
            numbered = enumerate(raw_batches, start=first)
            if self.on_cuda:
                yield from self._prefetched(numbered, epoch)
            else:
                for b, raw in numbered:
                    yield self._cpu_batch(raw, epoch, b)
        finally:
            raw_batches.close()

    def _read(self, indices: np.ndarray, epoch: int, first: int):
        from ffcv.pipeline.compiler import Compiler

        from capfast.data.ffcv_ops import GuardedEpochIterator

        with self._device_context(), torch_threads_kept():
            Compiler.set_num_threads(self.settings.workers)
            return GuardedEpochIterator(self._ffcv, indices, batch_memory=self._stage_memory(epoch, first))

    def _stage_memory(self, epoch: int, first: int) -> dict:
        """CPU: CropResizeDecoder's memory for each batch of this iterator (boxes drawn as on the GPU path)."""
        if self.settings.decoder != "ffcv":
            return {}
        decoder = self._ffcv.pipeline_specs[schema.IMAGE].decoder
        buffers = decoder.epoch_buffers(self.settings.batch_size)

        def memory_for(b: int, records: np.ndarray) -> tuple:
            boxes, factors = self._augmentation(torch.from_numpy(decoder.sizes(records)), epoch, first + b)
            return decoder.batch_memory(boxes.numpy(), None if factors is None else factors.numpy(), buffers)

        return {decoder: memory_for}

    def _prefetched(self, numbered, epoch: int) -> Iterator[Batch]:
        """Launches batch n+1 on the side stream before handing batch n to the consumer."""
        pending = None
        for b, raw in numbered:
            launched = self._cuda_batch(raw, epoch, b)
            if pending is not None:
                yield self._hand_over(*pending)
            pending = launched
        if pending is not None:
            yield self._hand_over(*pending)

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
        return augment.normalize(x, self.settings.dtype)

    def _resize_buffer(self, n: int):
        """Reused uint8 resize output on the CPU: fresh large allocations page-fault on every batch."""
        if self.on_cuda:
            return None
        size = self.settings.image_size
        if self._resized is None or len(self._resized) < n:
            self._resized = torch.empty((n, 3, size, size), dtype=torch.uint8, memory_format=torch.channels_last)
        return self._resized[:n]

    def _cpu_batch(self, raw, epoch: int, b: int) -> Batch:
        out = dict(zip(self._ffcv.pipeline_specs, raw))
        if self.settings.decoder == "ffcv":  # cropped, resized and normalized in ffcv's stage already
            return Batch(self._stage_images(out[schema.IMAGE]), *self._labels(out))
        boxes, factors = self._augmentation(out[IMAGE_INFO][:, :2].clone(), epoch, b)
        with single_torch_thread():
            images = self._images(out, boxes, factors)
        return Batch(images, *self._labels(out))

    def _stage_images(self, images: torch.Tensor) -> torch.Tensor:
        """CropResizeDecoder's [B, S, S, 3] output as the model's [B, 3, S, S] channels_last input."""
        dtype = self.settings.dtype
        if dtype == torch.bfloat16:
            images = images.view(torch.bfloat16)
        images = images.permute(0, 3, 1, 2)
        return images.to(dtype) if images.dtype != dtype else images  # float16: computed as float32

    def _cuda_batch(self, raw, epoch: int, b: int):
        """Enqueues decode + transforms of one batch on the side stream; returns (Batch, ready event)."""
        out = dict(zip(self._ffcv.pipeline_specs, raw))
        boxes, factors = self._augmentation(out[IMAGE_INFO][:, :2].clone(), epoch, b)
        self._stream.synchronize()  # see decode_jpegs: nothing may be queued on the decoding stream
        with torch.cuda.stream(self._stream):
            labels = self._labels(out)  # synchronous copies, before the stream has work queued
            images = self._images(out, boxes, factors)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return Batch(images, *labels), ready

    def _images(self, out: dict, boxes, factors) -> torch.Tensor:
        """The batch's model input from the JPEG bytes (nvJPEG on CUDA)."""
        from capfast.data.jpeg import decode_jpegs

        encoded = [out[schema.IMAGE][i, :n] for i, n in enumerate(out[IMAGE_INFO][:, 2].tolist())]
        decoded = augment.pad_images(decode_jpegs(encoded, self.settings.device))
        return self._finish_images(decoded, boxes, factors)

    def _hand_over(self, batch: Batch, ready) -> Batch:
        consumer = torch.cuda.current_stream(self.settings.device)
        consumer.wait_event(ready)
        for tensor in batch.tensors():
            tensor.record_stream(consumer)  # the allocator must not recycle it while the consumer still reads it
        return batch

    def _labels(self, out: dict) -> tuple:
        """captions, ncaptions, image_ids as int64 copies on the device (ffcv reuses its buffers)."""
        device = self.settings.device

        def owned(t):
            return t.to(device=device, dtype=torch.int64, copy=True)

        return owned(out[schema.CAPTIONS]), owned(out[schema.NCAPTIONS].view(-1)), owned(out[schema.IMAGE_ID].view(-1))

    # ---- ffcv setup -----------------------------------------------------------------------------------

    def _device_context(self):
        # ffcv creates CUDA streams on the current device: make it ours, not cuda:0 on every rank
        return torch.cuda.device(self.settings.device) if self.on_cuda else contextlib.nullcontext()

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

        if self.settings.decoder == "ffcv":
            image_decoder = self._crop_resize_decoder()
        else:
            image_decoder = JpegBytesDecoder(self.max_jpeg_bytes)
        return {
            schema.IMAGE: PipelineSpec(schema.IMAGE, decoder=image_decoder, transforms=[ToTensor()]),
            schema.CAPTIONS: PipelineSpec(schema.CAPTIONS, decoder=NDArrayDecoder(), transforms=[ToTensor()]),
            schema.NCAPTIONS: PipelineSpec(schema.NCAPTIONS, decoder=IntDecoder(), transforms=[ToTensor()]),
            schema.IMAGE_ID: PipelineSpec(schema.IMAGE_ID, decoder=IntDecoder(), transforms=[ToTensor()]),
            IMAGE_INFO: PipelineSpec(schema.IMAGE, decoder=ImageInfoDecoder(), transforms=[ToTensor()]),
        }

    def _crop_resize_decoder(self):
        from capfast.data.ffcv_ops import CropResizeDecoder

        c = augment.constants(torch.device("cpu"))
        out_dtype = np.int16 if self.settings.dtype == torch.bfloat16 else np.float32  # bfloat16 travels as bits
        return CropResizeDecoder(self.settings.image_size, out_dtype, c["mean"].view(3).numpy(),
                                 c["inv_std"].view(3).numpy())

    def _quasi_order(self):
        from ffcv.traversal_order import QuasiRandom

        # ffcv's page-local shuffle of the whole split; capfast shards it per rank itself (ffcv refuses to)
        return QuasiRandom(self._ffcv)


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


# ---- argument checks ---------------------------------------------------------------------------------

def _check_images(reader, beton: str) -> int:
    """Largest stored JPEG in bytes; CapfastError unless every image is stored as JPEG."""
    if reader.num_samples == 0:
        raise CapfastError(f"{beton} has no records")
    meta = reader.metadata[f"f{reader.field_names.index(schema.IMAGE)}"]
    if np.any(meta["mode"] != JPG_MODE):
        raise CapfastError(f"{beton} stores raw (not JPEG) images; convert it again with capfast convert")
    table = reader.alloc_table
    by_ptr = np.argsort(table["ptr"])
    sizes = table["size"][by_ptr][np.searchsorted(table["ptr"][by_ptr], meta["data_ptr"])]
    return int(sizes.max())


def _shard(distributed: bool) -> orders.Shard:
    if not distributed:
        return orders.Shard()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CapfastError("distributed=True needs torch.distributed initialized first (init_process_group)")
    return orders.Shard(dist.get_rank(), dist.get_world_size())


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise CapfastError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CapfastError(f"unknown device {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise CapfastError(f"the loader runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapfastError("device cuda requested but CUDA is not available")
    return device


def _dtype(dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise CapfastError(f"image dtype must be one of float32, bfloat16, float16; got {dtype}")
    return dtype


def resolve_workers(num_workers) -> int:
    """ffcv threads: all cores this process may use (shared by the ranks of a node), clamped, since ffcv
    raises when asked for more threads than cores."""
    cores = len(os.sched_getaffinity(0))
    if num_workers is None:
        return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, min(int(num_workers), cores))


def _seed(seed) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise CapfastError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _order(order: str) -> str:
    if order not in orders.ORDERS:
        raise CapfastError(f"unknown order {order!r}; choose one of {', '.join(orders.ORDERS)}")
    return order


def _range(values, what: str, upper) -> tuple:
    low, high = (float(v) for v in values)
    if not (0 < low <= high) or (upper is not None and high > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise CapfastError(f"{what} must be (low, high) with 0 < low <= high{bound}, got {tuple(values)}")
    return low, high


def _jitter(strength) -> float:
    if not 0 <= float(strength) < 1:
        raise CapfastError(f"color jitter must be in [0, 1), got {strength}")
    return float(strength)
