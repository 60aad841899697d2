"""`capfast caption`: one caption per image file, for any image PIL can read (size, mode, EXIF rotation)."""

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

from capfast.errors import CapfastError


def read_image(path: Path) -> torch.Tensor:
    """[3,H,W] uint8, upright RGB; raises CapfastError naming the file when it cannot be read."""
    from capfast.images import BadImage, load_rgb

    try:
        image = load_rgb(Path(path))
    except BadImage as e:
        raise CapfastError(f"{path}: {e}") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


@torch.inference_mode()
def caption_images(model, vocab, images: list[torch.Tensor], *, image_size: int, beam_size=3, max_len=20,
                   batch_size=32, amp_dtype=None) -> list[str]:
    from capfast.data import preprocess_images
    from capfast.evaluate import caption_batch

    device = next(model.parameters()).device
    captions = []
    for start in range(0, len(images), batch_size):
        batch = preprocess_images(images[start:start + batch_size], image_size=image_size, device=device,
                                  dtype=amp_dtype or torch.float32)
        captions += caption_batch(model, batch, vocab, beam_size, max_len, amp_dtype)
    return captions


@click.command()
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(path_type=Path),
              help="A checkpoint written by `capfast train`.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--beam", "beam_size", default=3, show_default=True, help="Beam size; 1 = greedy.")
@click.option("--max-len", default=20, show_default=True, help="Longest caption, in tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line: {file, caption}.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def command(checkpoint_path, images, beam_size, max_len, as_json, device):
    """Caption IMAGES. A file that cannot be read gets an error line; the others are still captioned,
    and the exit code is non-zero if any failed."""
    from capfast.checkpoint import load_model
    from capfast.train.precision import resolve_device

    if beam_size < 1:
        raise CapfastError("--beam must be at least 1")
    model, vocab, state = load_model(checkpoint_path, resolve_device(device))
    readable, tensors, failed = [], [], 0
    for path in images:
        try:
            tensors.append(read_image(path))
            readable.append(path)
        except CapfastError as e:
            click.echo(f"capfast: error: {e}", err=True)
            failed += 1
    captions = caption_images(model, vocab, tensors, image_size=state["image_size"], beam_size=beam_size,
                              max_len=max_len) if tensors else []
    for path, caption in zip(readable, captions):
        click.echo(json.dumps({"file": str(path), "caption": caption}) if as_json else f"{path}\t{caption}")
    if failed:
        sys.exit(1)
