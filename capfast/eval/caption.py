"""`capfast caption`: one caption per image file, for any image PIL can read (size, mode, EXIF rotation); a folder
stands for the image files directly inside it."""

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

from capfast.errors import CapfastError
from capfast.eval.cli_options import generation_options
from capfast.models.generate import GenerationOptions

SHOWN_SKIPPED = 5


def read_image(path: Path) -> torch.Tensor:
    """[3,H,W] uint8, upright RGB; raises CapfastError naming the file when it cannot be read."""
    from capfast.pack.images import BadImage, load_rgb

    try:
        image = load_rgb(Path(path))
    except BadImage as e:
        raise CapfastError(f"{path}: {e}") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def image_suffixes() -> set[str]:
    """File name suffixes of the formats PIL can open (.jpg, .png, .webp, ...), lower case."""
    from PIL import Image

    return {suffix for suffix, format in Image.registered_extensions().items() if format in Image.OPEN}


def expand_folders(paths: list[Path]) -> tuple[list[Path], int]:
    """(`paths` with each folder replaced by the image files directly inside it, sorted by name; the number of
    folders without any). What else a folder holds (other files, subfolders) is skipped with a note; a folder
    without images gets an error line."""
    files, empty = [], 0
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        entries = sorted(path.iterdir())
        images = [entry for entry in entries if entry.is_file() and entry.suffix.lower() in image_suffixes()]
        skipped = [entry.name + ("/" if entry.is_dir() else "") for entry in entries if entry not in images]
        if skipped:
            shown = ", ".join(skipped[:SHOWN_SKIPPED]) + (", ..." if len(skipped) > SHOWN_SKIPPED else "")
            click.echo(f"capfast: note: {path}: skipping {len(skipped)} entries that are not image files ({shown})",
                       err=True)
        if not images:
            click.echo(f"capfast: error: {path} holds no image files", err=True)
            empty += 1
        files += images
    return files, empty


@torch.inference_mode()
def caption_images(model, vocab, images: list[torch.Tensor], *, generation: GenerationOptions, batch_size=32,
                   amp_dtype=None) -> list[str]:
    """Each uint8 [3, h, w] image resized whole to the model's input size and normalized as its encoder wants."""
    from capfast.data import preprocess_images
    from capfast.eval.evaluate import caption_batch

    device = next(model.parameters()).device
    captions = []
    for start in range(0, len(images), batch_size):
        batch = preprocess_images(images[start:start + batch_size], image_size=model.image_size, device=device,
                                  dtype=amp_dtype or torch.float32, normalization=model.normalization)
        captions += caption_batch(model, batch, vocab, generation, amp_dtype)
    return captions


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@generation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line: {file, caption}.")
def command(images, checkpoint_path, beam_size, max_len, device, as_json):
    """Caption IMAGES (files, or folders: their image files, sorted, not recursing). A file that cannot be read
    gets an error line; the others are still captioned, and the exit code is non-zero if any failed."""
    from capfast.common.precision import resolve_device
    from capfast.models.load import load_model

    files, failed = expand_folders(list(images))
    model, record = load_model(checkpoint_path, resolve_device(device))
    vocab = record.vocab
    readable, tensors = [], []
    for path in files:
        try:
            tensors.append(read_image(path))
            readable.append(path)
        except CapfastError as e:
            click.echo(f"capfast: error: {e}", err=True)
            failed += 1
    generation = GenerationOptions(beam_size=beam_size, max_len=max_len)
    captions = caption_images(model, vocab, tensors, generation=generation) if tensors else []
    for path, caption in zip(readable, captions):
        click.echo(json.dumps({"file": str(path), "caption": caption}) if as_json else f"{path}\t{caption}")
    if failed:
        sys.exit(1)
