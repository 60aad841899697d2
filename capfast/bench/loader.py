"""`capfast bench loader`: capfast's loader vs a torch DataLoader that PIL-decodes the same JPEG bytes.

Both produce the same thing: random-resized crops (same size, scale and ratio), normalized float tensors,
captions, on the chosen device. The baseline's bytes are read out of the beton once, before timing, so it pays
no file I/O that capfast pays. Warm-up batches (numba compilation, worker start-up) are not timed.

Decoding cost grows with the stored JPEG size (synthetic shapes compress to ~5 KB at 256², COCO photos take
~20 KB), so every run prints the beton's mean stored JPEG size. On CUDA it also times one batched decode_jpegs
of a batch of the same bytes alone, the ceiling the loader can approach, and prints the loader's fraction of it.
"""

import io
import time

import click
import numpy as np
import torch

from capfast.errors import CapfastError

WARMUP_BATCHES = 3
CROP_SCALE, CROP_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


class PilDataset(torch.utils.data.Dataset):
    """What a typical captioning repo does per sample: PIL decode, RandomResizedCrop, ToTensor, Normalize."""

    def __init__(self, jpegs: list[bytes], captions: np.ndarray, image_size: int):
        import torchvision.transforms as T

        from capfast.data.augment import IMAGENET_MEAN, IMAGENET_STD

        self.jpegs, self.captions = jpegs, captions
        self.transform = T.Compose([T.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO),
                                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i):
        from PIL import Image

        image = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        return self.transform(image), torch.from_numpy(self.captions[i].astype(np.int64))


def timed(batches, n: int, batch_size: int, device: torch.device) -> float:
    """img/s over `n` batches after WARMUP_BATCHES; `batches` must yield (images, ...) forever."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    sync(device)
    started = time.perf_counter()
    for _ in range(n):
        next(batches)
    sync(device)
    elapsed = time.perf_counter() - started
    batches.close()  # stops the loader's threads before the other loader is timed
    return n * batch_size / elapsed


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
    from capfast.inspect_beton import BetonContents

    contents = BetonContents(beton)
    count = min(count, len(contents))
    return [contents.image_bytes(i) for i in range(count)], contents.captions_of(np.arange(count))


def run_capfast(beton, device, batch_size, workers, batches, image_size, prefetch=3) -> float:
    from capfast.data import build_loader

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loader = build_loader(beton, batch_size=batch_size, train=True, device=device, dtype=dtype,
                          image_size=image_size, num_workers=workers, crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO,
                          prefetch=prefetch)
    return timed(capfast_batches(loader), batches, batch_size, device)


def run_baseline(beton, device, batch_size, workers, batches, image_size) -> float:
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
    from capfast.inspect_beton import BetonContents

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
@click.option("--prefetch", default=3, show_default=True, type=click.IntRange(min=0),
              help="Batches the loader's producer thread prepares ahead (0: none, the synchronous path).")
@click.option("--image-size", default=224, show_default=True, type=int, help="Crop size.")
@click.option("--baseline", is_flag=True, help="Also time torch DataLoader + PIL decode in the same run.")
def command(beton, device, batch_size, workers, batches, prefetch, image_size, baseline):
    """Loader throughput (img/s) on the training path: decode, random-resized crop, normalize, on the device."""
    if min(batch_size, batches, image_size) < 1 or (workers is not None and workers < 1):
        raise CapfastError("--batch-size, --batches, --image-size and --workers must be >= 1")
    from capfast.data.loader import resolve_workers

    device = torch.device(device)
    workers = resolve_workers(workers)
    capfast_img_s = run_capfast(beton, device, batch_size, workers, batches, image_size, prefetch)
    click.echo(f"capfast loader ({device.type}, {workers} workers, batch {batch_size}, {image_size} px, "
               f"prefetch {prefetch}): {capfast_img_s:.1f} img/s")
    jpeg_fields = jpeg_and_ceiling_figures(beton, device, batch_size, capfast_img_s)
    baseline_img_s = ratio = float("nan")
    if baseline:
        baseline_img_s = run_baseline(beton, device, batch_size, workers, batches, image_size)
        ratio = capfast_img_s / baseline_img_s
        click.echo(f"baseline torch DataLoader + PIL ({workers} workers): {baseline_img_s:.1f} img/s")
        click.echo(f"speedup: {ratio:.2f}x")
    click.echo(f"capfast_img_s={capfast_img_s:.1f} baseline_img_s={baseline_img_s:.1f} ratio={ratio:.2f} "
               f"{jpeg_fields}")
