"""`capfast bench loader`: capfast's loader vs two baselines on the same beton, in the same run.

- `--baseline pil` (or plain `--baseline`): a torch DataLoader that PIL-decodes the same JPEG bytes, as a typical
  captioning repo does. It produces what capfast does: random-resized crops (same size, scale and ratio),
  normalized float tensors, captions, on the chosen device. Its bytes are read out of the beton once, before
  timing, so it pays no file I/O that capfast pays.
- `--baseline ffcv`: ffcv's own pipeline, RandomResizedCropRGBImageDecoder -> ToTensor -> ToTorchImage, on the
  same beton, batch, crop size and threads. It does less than capfast: uint8 crops, not normalized, resized with
  OpenCV's INTER_AREA (no antialiased bilinear, no seeded boxes).
- `--baseline all`: both.
- `--verify`: capfast's loader again with data.verify (each record checked against its checksum): verify_ratio is
  its speed over the same loader's without it, so 1 - verify_ratio is the check's cost.

Warm-up batches (numba compilation, worker start-up) are not timed. With `--rounds N` each contender runs N
times, interleaved, and its best run counts.

Decoding cost grows with the stored JPEG size (synthetic shapes compress to ~5 KB at 256², COCO photos take
~20 KB), so every run prints the beton's mean stored JPEG size. On CUDA it also times one batched decode_jpegs
of a batch of the same bytes alone, the ceiling the loader can approach, and prints the loader's fraction of it.
"""

import functools
import io
import time
from typing import NamedTuple

import click
import numpy as np
import torch

from capfast.common.options import default
from capfast.data import LoaderOptions
from capfast.errors import CapfastError
from capfast.store import schema

WARMUP_BATCHES = 3
CROP_SCALE, CROP_RATIO = default(LoaderOptions, "crop_scale"), default(LoaderOptions, "crop_ratio")


class PilDataset(torch.utils.data.Dataset):
    """What a typical captioning repo does per sample: PIL decode, RandomResizedCrop, ToTensor, Normalize."""

    def __init__(self, jpegs: list[bytes], captions: np.ndarray, image_size: int):
        import torchvision.transforms as T

        from capfast.common.normalization import IMAGENET

        self.jpegs, self.captions = jpegs, captions
        self.transform = T.Compose([T.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO),
                                    T.ToTensor(), T.Normalize(IMAGENET.mean, IMAGENET.std)])

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i):
        from PIL import Image

        image = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        return self.transform(image), torch.from_numpy(self.captions[i].astype(np.int64))


class Timing(NamedTuple):
    img_s: float
    cores: float  # this process's CPU seconds per second while timed (threads; not DataLoader's subprocesses)


def timed(batches, n: int, batch_size: int, device: torch.device) -> Timing:
    """img/s over `n` batches after WARMUP_BATCHES; `batches` must yield (images, ...) forever."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(batches)
    sync(device)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    batches.close()  # stops the loader's threads before the other loader is timed
    return Timing(n * batch_size / elapsed, cpu / elapsed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capfast_batches(loader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def baseline_batches(loader, device: torch.device):
    while True:
        for images, captions in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images, captions.to(device, non_blocking=True)


def read_records(beton, count: int):
    """JPEG bytes and captions of the first `count` records, straight from the file."""
    from capfast.store.beton import BetonContents

    contents = BetonContents(beton)
    count = min(count, len(contents))
    return [contents.image_bytes(i) for i in range(count)], contents.captions_of(np.arange(count))


def run_capfast(beton, device, batch_size, workers, batches, image_size, prefetch, verify=False) -> Timing:
    from capfast.common.normalization import IMAGENET
    from capfast.data import build_loader

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    options = LoaderOptions(batch_size=batch_size, image_size=image_size, workers=workers, prefetch=prefetch,
                            verify=verify)
    loader = build_loader(beton, options, train=True, device=device, dtype=dtype, normalization=IMAGENET)
    return timed(capfast_batches(loader), batches, batch_size, device)


def ffcv_batches(loader, device: torch.device):
    """ffcv's own epochs; each closed (its thread joined) when the timing stops, so none runs on behind it."""
    from ffcv.pipeline.compiler import Compiler

    from capfast.data.ffcv_ops import GuardedEpochIterator

    while True:
        Compiler.set_num_threads(loader.num_workers)
        order = loader.next_traversal_order()[:len(loader) * loader.batch_size]
        epoch = GuardedEpochIterator(loader, order)  # ffcv's EpochIterator, with a close() that joins its thread
        try:
            for batch in epoch:
                out = dict(zip(loader.pipeline_specs, batch))
                yield out[schema.IMAGE].to(device), out[schema.CAPTIONS].to(device)
        finally:
            epoch.close()


def run_ffcv(beton, device, batch_size, workers, batches, image_size) -> Timing:
    from ffcv.fields.decoders import NDArrayDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    from capfast.data.loader import torch_threads_kept

    decoder = RandomResizedCropRGBImageDecoder((image_size, image_size), scale=CROP_SCALE, ratio=CROP_RATIO)
    pipelines = {schema.IMAGE: [decoder, ToTensor(), ToTorchImage()], schema.CAPTIONS: [NDArrayDecoder(), ToTensor()]}
    with torch_threads_kept():  # ffcv sets torch's thread count to its own
        loader = Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM, seed=0,
                        drop_last=True, pipelines=pipelines)
    if len(loader) == 0:
        raise CapfastError(f"{beton} has fewer records than one batch of {batch_size}")
    return timed(ffcv_batches(loader, device), batches, batch_size, device)


def run_baseline(beton, device, batch_size, workers, batches, image_size) -> Timing:
    jpegs, captions = read_records(beton, (batches + WARMUP_BATCHES) * batch_size)
    if len(jpegs) < batch_size:
        raise CapfastError(f"{beton} has fewer records than one batch of {batch_size}")
    loader = torch.utils.data.DataLoader(
        PilDataset(jpegs, captions, image_size), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    return timed(baseline_batches(loader, device), batches, batch_size, device)


# ---- stored JPEG size and the decode ceiling -----------------------------------------------------------

CEILING_BATCHES = 4  # distinct batches of bytes, decoded in turn
CEILING_WARMUP, CEILING_REPEATS = 2, 12


def mean_jpeg_bytes(beton) -> float:
    from capfast.store.beton import BetonContents

    return float(BetonContents(beton).image_nbytes().mean())


def decode_ceiling(beton, device: torch.device, batch_size: int) -> float:
    """img/s of one batched decode_jpegs call of `batch_size` stored JPEGs at a time, nothing else running."""
    from capfast.data.jpeg import decode_jpegs

    jpegs, _ = read_records(beton, CEILING_BATCHES * batch_size)
    encoded = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
    groups = [encoded[i:i + batch_size] for i in range(0, len(encoded) - batch_size + 1, batch_size)]
    if not groups:
        raise CapfastError(f"{beton} has fewer records than one batch of {batch_size}")
    for i in range(CEILING_WARMUP):
        decode_jpegs(groups[i % len(groups)], device)
    sync(device)
    started = time.perf_counter()
    for i in range(CEILING_REPEATS):
        decode_jpegs(groups[i % len(groups)], device)
    sync(device)
    return CEILING_REPEATS * batch_size / (time.perf_counter() - started)


def jpeg_and_ceiling_figures(beton, device: torch.device, batch_size: int, capfast_img_s: float) -> str:
    """Prints the mean stored JPEG size and, on CUDA, the decode ceiling; returns their key=value fields."""
    mean_bytes = mean_jpeg_bytes(beton)
    click.echo(f"stored JPEGs: mean {mean_bytes / 1024:.1f} KB ({mean_bytes:,.0f} bytes)")
    ceiling = fraction = float("nan")
    if device.type == "cuda":
        ceiling = decode_ceiling(beton, device, batch_size)
        fraction = capfast_img_s / ceiling
        click.echo(f"decode ceiling: one batched decode_jpegs of {batch_size} images: {ceiling:.1f} img/s; "
                   f"the loader reaches {fraction:.2f} of it")
    return f"mean_jpeg_kb={mean_bytes / 1024:.1f} ceiling_img_s={ceiling:.1f} ceiling_fraction={fraction:.2f}"


@click.command()
@click.option("--data", "beton", required=True, type=click.Path(dir_okay=False), help="A .beton from capfast convert.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", type=int, default=None, help="ffcv threads and DataLoader workers [default: all cores].")
@click.option("--batches", default=20, show_default=True, type=int, help="Timed batches, after 3 warm-up batches.")
@click.option("--prefetch", default=default(LoaderOptions, "prefetch"), show_default=True, type=click.IntRange(min=0),
              help="Batches the loader's producer thread prepares ahead (0: none, the synchronous path).")
@click.option("--image-size", default=224, show_default=True, type=int, help="Crop size.")
@click.option("--baseline", type=click.Choice(["pil", "ffcv", "all"]), default=None, is_flag=False, flag_value="pil",
              help="Also time, in the same run: pil = torch DataLoader + PIL decode (plain --baseline), ffcv = "
                   "ffcv's own RandomResizedCrop pipeline, all = both.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Runs of each contender, interleaved; the best counts (shared machines: load comes and goes).")
@click.option("--verify", is_flag=True,
              help="Also time the loader with data.verify (records checked against their checksums): its cost.")
def command(beton, device, batch_size, workers, batches, prefetch, image_size, baseline, rounds, verify):
    """Loader throughput (img/s) on the training path: decode, random-resized crop, normalize, on the device."""
    if min(batch_size, batches, image_size) < 1 or (workers is not None and workers < 1):
        raise CapfastError("--batch-size, --batches, --image-size and --workers must be >= 1")
    from capfast.data.loader import resolve_workers

    device = torch.device(device)
    workers = resolve_workers(workers or 0)
    args = (beton, device, batch_size, workers, batches, image_size)
    contenders = {"capfast": functools.partial(run_capfast, *args, prefetch)}
    if verify:
        contenders["verify"] = functools.partial(run_capfast, *args, prefetch, True)
    if baseline in ("pil", "all"):
        contenders["pil"] = functools.partial(run_baseline, *args)
    if baseline in ("ffcv", "all"):
        contenders["ffcv"] = functools.partial(run_ffcv, *args)
    best = {}
    for _ in range(rounds):
        for name, run in contenders.items():
            timing = run()
            if name not in best or timing.img_s > best[name].img_s:
                best[name] = timing
    report(best, device, workers, batch_size, image_size, prefetch, rounds, beton)


def report(best: dict, device, workers, batch_size, image_size, prefetch, rounds, beton) -> None:
    nan = Timing(float("nan"), float("nan"))
    capfast, pil, ffcv, verify = best["capfast"], best.get("pil", nan), best.get("ffcv", nan), best.get("verify", nan)
    of_rounds = f", best of {rounds}" if rounds > 1 else ""
    click.echo(f"capfast loader ({device.type}, {workers} workers, batch {batch_size}, {image_size} px, "
               f"prefetch {prefetch}{of_rounds}): {capfast.img_s:.1f} img/s, {capfast.cores:.2f} cores busy")
    jpeg_fields = jpeg_and_ceiling_figures(beton, device, batch_size, capfast.img_s)
    ratio, ffcv_ratio = capfast.img_s / pil.img_s, capfast.img_s / ffcv.img_s
    verify_ratio = verify.img_s / capfast.img_s
    if "verify" in best:
        click.echo(f"capfast loader with data.verify: {verify.img_s:.1f} img/s, {verify.cores:.2f} cores busy: "
                   f"{verify_ratio:.3f} of the same loader without it")
    if "pil" in best:
        click.echo(f"baseline torch DataLoader + PIL ({workers} workers): {pil.img_s:.1f} img/s")
        click.echo(f"speedup: {ratio:.2f}x")
    if "ffcv" in best:
        click.echo(f"baseline ffcv RandomResizedCropRGBImageDecoder -> ToTensor -> ToTorchImage ({workers} threads, "
                   f"uint8, not normalized): {ffcv.img_s:.1f} img/s, {ffcv.cores:.2f} cores busy")
        click.echo(f"capfast / ffcv: {ffcv_ratio:.2f}x")
    click.echo(f"capfast_img_s={capfast.img_s:.1f} baseline_img_s={pil.img_s:.1f} ratio={ratio:.2f} "
               f"ffcv_img_s={ffcv.img_s:.1f} ffcv_ratio={ffcv_ratio:.2f} {jpeg_fields} "
               f"verify_img_s={verify.img_s:.1f} verify_ratio={verify_ratio:.3f}")
