"""The CPU loader's parallel stage: ffcv_ops.CropResizeDecoder and its numba kernels (capfast/data/resize_cpu.py).

test_loader.py checks the CPU batches against torchvision's decode; these check the stage's own parts exactly:
the filter, the seeded boxes on the same decoded pixels, the output arrays' lifetime, and the thread count.
"""

import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capfast.common.normalization import IMAGENET
from capfast.data import LoaderOptions, augment, build_loader, resize_cpu
from capfast.data.order import batch_seed
from capfast.store import schema

LEVEL = 1 / 255 / min(IMAGENET.std)  # one uint8 level, normalized
SIZE = 24


def write_beton(path, images, quality=90):
    from ffcv.writer import DatasetWriter

    fields = schema.beton_fields(captions_per_image=2, max_len=4, jpeg_quality=quality, checksums=False)  # format 1
    records = [(image, np.full((2, 6), i, np.int32), 1, 100 + i) for i, image in enumerate(images)]
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(records)
    return path


def noise_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def noise_beton(tmp_path_factory):
    """24 records of noise (the hardest case for a resize): mixed sizes, then 256 x 256 ones."""
    sizes = [(64, 48), (40, 64), (64, 64), (33, 50), (64, 20), (50, 50)] + [(256, 256)] * 18
    return write_beton(tmp_path_factory.mktemp("noise") / "noise.beton", noise_images(sizes, seed=1))


def loader(beton, train: bool, seed: int = 0, **options):
    """The CPU loader on one ffcv thread, SIZE² unless `options` (LoaderOptions' fields) say otherwise."""
    options = LoaderOptions(**{"image_size": SIZE, "workers": 1, **options})
    return build_loader(beton, options, train=train, seed=seed, normalization=IMAGENET)


def ffcv_decoded(beton) -> list[torch.Tensor]:
    """uint8 [3, H, W] of each record, decoded by the loader's own libjpeg-turbo call (ffcv's imdecode, fast DCT)."""
    from ffcv.libffcv import imdecode
    from numba import njit

    from capfast.store.beton import BetonContents

    contents, decode, images = BetonContents(beton), njit(imdecode), []
    for record in range(len(contents)):
        w, h = contents.image_size(record)
        out = np.empty(h * w * 3, np.uint8)
        decode(np.frombuffer(contents.image_bytes(record), np.uint8), out, h, w, h, w, 0, 0, 1, 1, False, False)
        images.append(torch.from_numpy(out.reshape(h, w, 3)).permute(2, 0, 1))
    return images


def torch_reference(image: torch.Tensor, box, size: int, factors=None, dtype=torch.float32) -> torch.Tensor:
    """[3, size, size]: the crop resized by PyTorch's antialiased bilinear (float, rounded), jittered, normalized."""
    top, left, h, w = box
    crop = image[None, :, top:top + h, left:left + w].float()
    x = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255)
    if factors is not None:
        x = augment.color_jitter(x, factors[None])
    return augment.normalize(x, dtype, IMAGENET)[0].float()


def rounding(factors=None) -> float:
    """A level of rounding difference, normalized, as far as colour jitter can stretch it: each step mixes a
    pixel with f times itself and 1 - f times a mean, so an error e becomes at most (f + |1 - f|) e."""
    stretch = 1.0 if factors is None else float((2 * factors - 1).clamp(min=1).prod())
    return 1.01 * LEVEL * stretch


def kernel_output(image: torch.Tensor, box, size: int, factors=None, dtype=torch.float32) -> torch.Tensor:
    c = augment.constants(torch.device("cpu"), IMAGENET)
    shift, scale = (np.tile(c[k].view(3).numpy(), size) for k in ("mean", "inv_std"))
    out = np.empty((size, size * 3), np.int16 if dtype == torch.bfloat16 else np.float32)
    jitter = np.full(3, -1, np.float32) if factors is None else factors.numpy()
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy()).reshape(image.shape[1], -1)
    resize_cpu.crop_resize_normalize(pixels, np.array(box), jitter, shift, scale, out)
    return torch.from_numpy(out).view(dtype).view(size, size, 3).permute(2, 0, 1).float()


def test_taps_are_pytorch_s_antialiased_bilinear_weights():
    for start, length, size in [(0, 64, 24), (5, 150, 224), (3, 256, 224), (0, 1, 8), (2, 3, 8), (7, 300, 24)]:
        first, weights = resize_cpu.aa_taps(start, length, size)
        dense = np.zeros((size, start + length), np.float32)
        for i in range(size):
            dense[i, first[i]:first[i] + weights.shape[1]] += weights[i]
        expected = augment.aa_weights(torch.tensor([start]), torch.tensor([length]), start + length, size)[0]
        assert np.abs(dense - expected.numpy()).max() < 1e-6, (start, length, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_torch_s_resize_jitter_and_normalize(dtype):
    """Within a level of rounding (the uint8-rounded intermediate, as PyTorch's uint8 kernel has) and bfloat16's,
    and rounded to nearest: no bias on average (rounding down would pass the first check, off by -0.5 on average)."""
    image = torch.from_numpy(noise_images([(50, 70)])[0]).permute(2, 0, 1)
    bf16 = 0.02 if dtype == torch.bfloat16 else 0
    # downscaling (3+ taps), enlarging (2 taps: crops smaller than the output), mixed, single pixels
    for box in [(0, 0, 50, 70), (3, 5, 30, 40), (10, 2, 40, 7), (5, 8, 12, 9), (0, 0, 20, 22), (0, 0, 1, 1),
                (49, 69, 1, 1)]:
        for size in (SIZE, 13):
            for factors in (None, torch.tensor([1.3, 0.6, 1.4])):
                got = kernel_output(image, box, size, factors, dtype)
                expected = torch_reference(image, box, size, factors, dtype)
                assert (got - expected).abs().max() <= rounding(factors) + bf16
                if factors is None and dtype == torch.float32:
                    assert abs((got - expected).mean()) < 0.1 * LEVEL, (box, size)


def test_the_stage_resizes_the_seeded_boxes_of_the_loader_s_own_decode(noise_beton):
    """Same pixels as the stage (ffcv's decode), boxes recomputed from (seed, epoch, batch): only rounding differs."""
    train = loader(noise_beton, train=True, seed=7, batch_size=3, color_jitter=0.3)
    batches, records, decoded = list(train.epoch(1)), train.rank_order(1), ffcv_decoded(noise_beton)
    assert len(batches) == 8
    for b, batch in enumerate(batches):
        images = [decoded[r] for r in records[3 * b:3 * b + 3]]
        generator = torch.Generator().manual_seed(batch_seed(7, 1, b))
        boxes = augment.random_crop_boxes(augment.image_sizes(images), (0.35, 1.0), (3 / 4, 4 / 3), generator)
        factors = augment.jitter_factors(3, 0.3, generator)
        for image, box, jitter, got in zip(images, boxes.tolist(), factors, batch.images):
            assert (got - torch_reference(image, box, SIZE, jitter)).abs().max() <= rounding(jitter)


@pytest.mark.parametrize("batch_size", [5, 20])  # 20: a full chunk of decodes, a partial one (DECODES_PER_CHUNK 16)
def test_eval_stage_resizes_whole_images(noise_beton, batch_size):
    images = torch.cat([b.images for b in loader(noise_beton, train=False, batch_size=batch_size).epoch(0)])
    for image, got in zip(ffcv_decoded(noise_beton), images, strict=True):
        expected = torch_reference(image, (0, 0, image.shape[1], image.shape[2]), SIZE)
        assert (got - expected).abs().max() <= rounding()


def test_kept_batches_keep_their_pixels_and_dropped_ones_are_reused(noise_beton):
    train = loader(noise_beton, train=True, seed=0, batch_size=2)
    kept = list(train.epoch(0))  # 12 batches alive at once: more than the pool holds
    assert len({b.images.data_ptr() for b in kept}) == len(kept)
    streamed = set()
    for b, batch in enumerate(train.epoch(0)):  # each batch dropped before the next
        assert torch.equal(batch.images, kept[b].images)
        streamed.add(batch.images.data_ptr())
    assert len(streamed) < len(kept)


@pytest.fixture(scope="module")
def large_noise_beton(tmp_path_factory):
    """16 records of 512² noise: each image's work (decode, resize) dwarfs what a batch costs the producer thread,
    also when busy cores make every thread switch and wake-up dearer."""
    return write_beton(tmp_path_factory.mktemp("large") / "noise.beton", noise_images([(512, 512)] * 16, seed=2))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread CPU times from /proc")
def test_one_worker_means_one_thread_does_all_the_image_work(large_noise_beton):
    """Decode, crop, resize and normalize all ran on one thread (ffcv's), none on numba's or torch's pools, nor
    on the producer thread, which only wraps the finished arrays."""
    train = loader(large_noise_beton, train=True, seed=0, batch_size=8, image_size=224)
    list(train.epoch(0))  # compiles the stage
    with ThreadTimes() as used:
        list(train.epoch(1))  # a new ffcv thread and a new producer thread, gone when the epoch ends
    total = sum(used.values())
    busy = [tid for tid, ns in used.items() if ns > 0.2 * total]
    assert total > 30e6 and len(busy) == 1, used
    assert torch.get_num_threads() == 1  # ffcv gives torch the loader's thread count too


class ThreadTimes(dict):
    """{thread id: CPU ns used while inside}, sampled every millisecond from /proc so that threads that end
    inside are counted too (their last millisecond aside)."""

    def __enter__(self):
        self._before, self._stop = _thread_cpu_ns(), threading.Event()
        self._sampler = threading.Thread(target=self._sample)
        self._sampler.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._sampler.join()
        self._sample_once()
        self.pop(str(self._sampler.native_id), None)  # the sampler's own reads

    def _sample(self):
        while not self._stop.wait(0.001):
            self._sample_once()

    def _sample_once(self):
        for tid, ns in _thread_cpu_ns().items():
            self[tid] = ns - self._before.get(tid, 0)


def _thread_cpu_ns() -> dict:
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                times[tid] = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended
            continue
    return times
