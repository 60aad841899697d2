"""`capfast bench convert`: capfast convert vs a single-process PIL loop (open, RGB, resize 256², JPEG q90),
over the same synthetic photos-sized images. ffcv's one-off import (~5 s, numba) is done before timing."""

import io
import tempfile
import time
from pathlib import Path

import click
from PIL import Image

from capfast.errors import CapfastError

IMAGE_SIZE, QUALITY = 256, 90


def baseline_loop(paths: list[Path]) -> float:
    """Seconds for the plain loop most conversion scripts use."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            small = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        small.save(io.BytesIO(), format="JPEG", quality=QUALITY)
    return time.perf_counter() - started


def capfast_convert(root: Path, out: Path, workers: int) -> float:
    from capfast.convert import convert

    started = time.perf_counter()
    convert(out, "train", annotations=root / "annotations" / "captions_train.json", images=root / "images" / "train",
            workers=workers, min_count=1, image_size=IMAGE_SIZE, quality=QUALITY, progress=False)
    return time.perf_counter() - started


def run(n_images: int, workers: int | None, side_range=(480, 640)) -> dict:
    import ffcv.writer  # noqa: F401  (pay the import before timing)

    from capfast.convert import default_workers
    from capfast.synth import make_synthetic_coco

    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="capfast-bench-convert-") as tmp:
        root = make_synthetic_coco(Path(tmp) / "coco", n_train=n_images, n_val=0, seed=0, side_range=side_range)
        paths = sorted((root / "images" / "train").glob("*.jpg"))
        baseline_s = baseline_loop(paths)
        capfast_s = capfast_convert(root, Path(tmp) / "out", workers)
    return {"images": n_images, "workers": workers, "capfast_img_s": n_images / capfast_s,
            "baseline_img_s": n_images / baseline_s, "ratio": baseline_s / capfast_s}


@click.command()
@click.option("--images", "n_images", type=int, default=1500, show_default=True,
              help="Synthetic images (480-640 px); small runs are dominated by fixed start-up costs.")
@click.option("--workers", type=int, default=None, help="convert --workers [default: all cores].")
def command(n_images, workers):
    """Time `capfast convert` against a single-process PIL resize+encode loop."""
    if n_images < 1 or (workers is not None and workers < 1):
        raise CapfastError("--images and --workers must be >= 1")
    result = run(n_images, workers)
    click.echo(f"capfast convert ({result['workers']} workers): {result['capfast_img_s']:.1f} img/s")
    click.echo(f"baseline PIL loop (1 process):  {result['baseline_img_s']:.1f} img/s")
    click.echo(f"speedup: {result['ratio']:.2f}x")
    click.echo(f"capfast_img_s={result['capfast_img_s']:.1f} baseline_img_s={result['baseline_img_s']:.1f} "
               f"ratio={result['ratio']:.2f}")
