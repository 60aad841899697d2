"""`capfast bench convert`: `capfast convert` against two baselines doing the same job on the same images, with
the same number of processes, in the same run:

  baseline  the PIL loop most conversion scripts use (open, convert RGB, resize 256² bicubic, save JPEG q90),
            split over `workers` processes; it writes nothing
  ffcv      ffcv's own DatasetWriter + RGBImageField(write_mode="jpg", jpeg_quality=90) with `workers` processes,
            fed arrays that its workers decode (PIL, RGB) and resize to 256² (OpenCV INTER_AREA, the filter
            ffcv's max_resolution uses); it writes an image and an image-id field, no captions

capfast's time is its whole `convert` call: reading the annotations, tokenizing, building the vocabulary,
decoding/validating/resizing/encoding, writing the beton, refs and meta.json. ffcv's one-off import (seconds
of numba compilation) happens before any timing. Each contender runs `rounds` times, interleaved; the best
round counts (other processes on the machine only ever make a round slower).
"""

import contextlib
import io
import multiprocessing
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from capfast.errors import CapfastError

IMAGE_SIZE, QUALITY = 256, 90


def pil_encode(path: str) -> int:
    """The plain loop's work for one image: bytes of the JPEG it would store."""
    with Image.open(path) as img:
        small = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.tell()


def baseline_loop(paths: list[Path], workers: int) -> float:
    """Seconds for the PIL loop over `paths` with `workers` processes (pool start included)."""
    started = time.perf_counter()
    names = [str(p) for p in paths]
    if workers == 1:
        list(map(pil_encode, names))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(pil_encode, names, chunksize=max(1, len(names) // (workers * 8)))
    return time.perf_counter() - started


class DecodedImages:
    """What ffcv's writer is fed: (decoded RGB array resized to 256², index) per image."""

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import cv2

        with Image.open(self.paths[i]) as img:
            pixels = np.asarray(img.convert("RGB"))
        return cv2.resize(pixels, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA), i


def ffcv_writer(paths: list[Path], out: Path, workers: int) -> float:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from capfast.pack.pool import opencv_single_threaded

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=QUALITY), "image_id": IntField()}
    started = time.perf_counter()
    # its progress bar to nowhere; no OpenCV threads in this process while it forks its workers (see pool.py)
    with contextlib.redirect_stderr(io.StringIO()), opencv_single_threaded():
        DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(DecodedImages(paths))
    return time.perf_counter() - started


def capfast_convert(root: Path, out: Path, workers: int) -> float:
    from capfast.pack.convert import convert

    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its per-split summary line
        convert(out, "train", annotations=root / "annotations" / "captions_train.json",
                images=root / "images" / "train", workers=workers, min_count=1, image_size=IMAGE_SIZE,
                quality=QUALITY, progress=False, overwrite=True)
    return time.perf_counter() - started


def run(n_images: int, workers: int | None, rounds: int = 2, side_range=(480, 640), textured: bool = False) -> dict:
    import ffcv.writer  # noqa: F401  (pay the import before timing)

    from capfast.pack.convert import default_workers
    from capfast.pack.synth import make_synthetic_coco

    workers = workers or default_workers()
    best = {"capfast": float("inf"), "baseline": float("inf"), "ffcv": float("inf")}
    with tempfile.TemporaryDirectory(prefix="capfast-bench-convert-") as tmp:
        root = make_synthetic_coco(Path(tmp) / "coco", n_train=n_images, n_val=0, seed=0, side_range=side_range,
                                  texture=textured)
        paths = sorted((root / "images" / "train").glob("*.jpg"))
        for _ in range(rounds):
            best["capfast"] = min(best["capfast"], capfast_convert(root, Path(tmp) / "out", workers))
            best["baseline"] = min(best["baseline"], baseline_loop(paths, workers))
            best["ffcv"] = min(best["ffcv"], ffcv_writer(paths, Path(tmp) / "ffcv.beton", workers))
        input_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    speeds = {f"{name}_img_s": n_images / seconds for name, seconds in best.items()}
    return {"images": n_images, "workers": workers, "input_kb": input_kb, **speeds,
            "ratio": best["baseline"] / best["capfast"], "ffcv_ratio": best["ffcv"] / best["capfast"]}


@click.command()
@click.option("--images", "n_images", type=int, default=1500, show_default=True,
              help="Synthetic images (480-640 px); small runs are dominated by fixed start-up costs.")
@click.option("--workers", type=int, default=None, help="Processes for each contender [default: all cores].")
@click.option("--rounds", type=int, default=2, show_default=True, help="Runs of each contender; the best counts.")
@click.option("--textured", is_flag=True, help="Photo-like source images (JPEG sizes closer to COCO photos' than "
              "flat shapes'): decoding them costs what real photos cost.")
def command(n_images, workers, rounds, textured):
    """Time `capfast convert` against a PIL resize+encode loop and ffcv's own writer, all on the same images
    with the same number of processes. The ffcv writer is fed images its workers decode (PIL) and resize to 256²
    (OpenCV INTER_AREA), then JPEG-encodes them at q90 and writes an image + image-id beton; capfast's time
    also covers annotations, tokenizing, vocabulary, refs and meta.json."""
    if n_images < 1 or rounds < 1 or (workers is not None and workers < 1):
        raise CapfastError("--images, --rounds and --workers must be >= 1")
    result = run(n_images, workers, rounds, textured=textured)
    processes = f"{result['workers']} processes"
    kind = "textured (photo-like)" if textured else "flat-shape"
    click.echo(f"{result['images']} synthetic {kind} images of 480-640 px, mean {result['input_kb']:.0f} KB "
               "-> 256² JPEG q90")
    click.echo(f"capfast convert ({processes}):        {result['capfast_img_s']:.1f} img/s")
    click.echo(f"PIL decode+resize+encode loop ({processes}): {result['baseline_img_s']:.1f} img/s")
    click.echo(f"ffcv DatasetWriter, jpg ({processes}):  {result['ffcv_img_s']:.1f} img/s")
    click.echo(f"speedup: {result['ratio']:.2f}x over the PIL loop, {result['ffcv_ratio']:.2f}x over ffcv's writer")
    click.echo(f"capfast_img_s={result['capfast_img_s']:.1f} baseline_img_s={result['baseline_img_s']:.1f} "
               f"ratio={result['ratio']:.2f} ffcv_img_s={result['ffcv_img_s']:.1f} "
               f"ffcv_ratio={result['ffcv_ratio']:.2f}")
