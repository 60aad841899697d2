"""`capfast features`: a frozen trunk's features of each split, computed once and stored beside the betons
(capfast/store/feature_cache.py), so that training with that trunk frozen (`data.features = NAME`) neither decodes
a JPEG nor runs the trunk.

The trunk comes from a checkpoint, a run directory or an exported folder (--from: its trunk, image size and
normalization), or by name (--encoder, --encoder-weights, ...). Images go through capfast's own loader (nvJPEG on
CUDA, the CPU stage otherwise) with the evaluation transform (the whole image resized), then the trunk in eval
mode, under autocast, channels_last. Under torchrun each rank writes its contiguous share. Safe to kill: a
record's features count only once fsynced, a rerun computes the rest in the same batches (so it writes the same
bytes), and a split becomes visible only when complete.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from capfast.common import distributed, progress
from capfast.common.precision import DEVICES, autocast_context, resolve_precision
from capfast.errors import CapfastError
from capfast.store import feature_cache, schema
from capfast.store.feature_cache import DTYPES, VIEWS, FeatureCache, SplitWriter

FEATURE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Extraction:
    data_dir: Path
    name: str
    dtype: str = "fp16"
    flip: bool = False
    batch_size: int = 64     # over all processes
    workers: int = 0         # decode threads per process (0: all cores / processes of this node)
    precision: str = "auto"  # autocast: bf16 on CUDA, fp32 on the CPU
    progress_seconds: float = progress.DEFAULT_SECONDS


def extract(extraction: Extraction, model, splits: list[str], device: torch.device, dist) -> FeatureCache:
    """Writes (or completes) every split of `splits` with `model`'s trunk; returns the cache."""
    from capfast.common.io import ensure_writable_dir
    from capfast.store.checks import require_split

    for split in splits:
        require_split(extraction.data_dir, split)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    amp_dtype = _autocast_dtype(extraction.precision, device)
    if dist.is_main:
        ensure_writable_dir(feature_cache.cache_dir(extraction.data_dir, extraction.name), "feature cache folder")
        FeatureCache.create(extraction.data_dir, extraction.name, model.trunk_id(), extraction.dtype,
                            _feature_shape(model, device), VIEWS[:1 + extraction.flip])
    _barrier(dist)
    cache = FeatureCache.open(extraction.data_dir, extraction.name)
    for split in splits:
        _extract_split(extraction, cache, split, model, amp_dtype, device, dist)
    return cache


def _extract_split(extraction: Extraction, cache: FeatureCache, split: str, model, amp_dtype, device, dist) -> None:
    from capfast.store.beton import data_fingerprint

    beton = schema.beton_path(extraction.data_dir, split)
    source = data_fingerprint(beton)
    entry = cache.manifest["splits"].get(split)
    if entry is not None and entry["source"] == source:
        _say(dist, f"features {split}: already complete in {cache.path}")
        return
    writer = SplitWriter(cache, split, source)
    if dist.is_main:
        writer.prepare()
    _barrier(dist)
    loader = _loader(extraction, beton, model, amp_dtype, device, dist)
    _write_batches(extraction, writer, loader, model, amp_dtype, split)
    _barrier(dist)
    if dist.is_main:
        writer.finish()
        _say(dist, f"features {split}: {source['records']} records in {cache.features_path(split)}")


def _write_batches(extraction: Extraction, writer: SplitWriter, loader, model, amp_dtype, split: str) -> None:
    """This rank's share, batch by batch in fixed positions, skipping batches whose records are all on disk."""
    size, records = loader.settings.batch_size, loader.rank_order(0)
    done = writer.done()
    starts = range(0, len(records), size)
    first = next((b for b, start in enumerate(starts) if not done[records[start:start + size]].all()), len(starts))
    batches = loader.epoch(0, skip_batches=first)
    with torch.inference_mode(), batches:
        for b, batch in enumerate(progress.track(batches, len(starts) - first, f"features {split}", "batch",
                                                 extraction.progress_seconds), start=first):
            mine = records[b * size:(b + 1) * size]
            if not done[mine].all():
                writer.write(int(mine[0]), _rows(model, batch.images, amp_dtype, extraction))


def _rows(model, images: torch.Tensor, amp_dtype, extraction: Extraction) -> np.ndarray:
    """[n, views, S, width] in the cache's dtype, on the host."""
    with autocast_context(images.device, amp_dtype):
        views = [model.encoder.trunk_features(images)]
        if extraction.flip:
            views.append(model.encoder.trunk_features(images.flip(-1)))
    rows = torch.stack(views, dim=1).to(FEATURE_DTYPES[extraction.dtype])
    if extraction.dtype == "bf16":
        rows = rows.view(torch.int16)
    return rows.cpu().numpy().view(DTYPES[extraction.dtype])


def _loader(extraction: Extraction, beton: Path, model, amp_dtype, device, dist):
    from capfast.data import LoaderOptions, build_loader

    options = LoaderOptions(batch_size=extraction.batch_size, image_size=model.image_size,
                            workers=extraction.workers)
    return build_loader(beton, options, train=False, device=device, dtype=amp_dtype or torch.float32,
                        distributed=dist.enabled, normalization=model.normalization)


def _feature_shape(model, device) -> tuple:
    """[S, width] of the trunk's output for one image."""
    probe = torch.zeros(1, 3, model.image_size, model.image_size, device=device)
    with torch.inference_mode():
        return tuple(model.encoder.trunk_features(probe).shape[1:])


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return resolve_precision(precision, device)


def _barrier(dist) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def _say(dist, message: str) -> None:
    if dist.is_main:
        click.echo(message)


def _argv_without_nproc(ctx) -> list[str]:
    """This command's arguments, for each process that --nproc launches."""
    argv = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name == "nproc" or value is None or value is False:
            continue
        flag = param.opts[0]
        values = value if param.multiple else [value]
        argv += [flag] if value is True else [a for v in values for a in (flag, str(v))]
    return argv


# ---- where the trunk comes from --------------------------------------------------------------------------

def trunk_model(source: Path | None, encoder: str | None, weights: str | None, depth: int, class_token: str,
                image_size: int | None):
    """A captioner whose trunk is the one asked for (its decoder is never used): a trained model's (`source`),
    or the named `encoder` with `weights` (pretrained, a local file, random)."""
    from capfast.models import ModelConfig, build_captioner

    if (source is None) == (encoder is None):
        raise CapfastError("give the trunk either with --from (a checkpoint, run directory or exported model) or "
                           "with --encoder (a name, e.g. timm:vit_base_patch16_clip_224.openai)")
    if source is not None:
        from capfast.models.load import load_model

        return load_model(source)[0]
    config = ModelConfig.from_dict({"encoder": encoder, "encoder_weights": weights, "encoder_depth": depth,
                                    "class_token": class_token, "d_model": 8, "n_heads": 1, "n_layers": 1})
    return build_captioner(config, vocab_size=4, image_size=image_size)


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by `capfast convert`; the cache goes to DATA/features/NAME.")
@click.option("--name", required=True, help="The cache's name: a recipe reads it with data.features = NAME.")
@click.option("--split", "splits", multiple=True, default=("train", "val"), show_default=True,
              help="A split to compute (repeat for several).")
@click.option("--from", "source", type=click.Path(path_type=Path),
              help="The trunk of this model: a checkpoint, a run directory (best.pt) or an exported folder.")
@click.option("--encoder", help="Or a trunk by name, as model.encoder takes it (resnet50, vit_b_16, timm:...).")
@click.option("--encoder-weights", default="pretrained", show_default=True,
              help="With --encoder: pretrained (the library's, downloaded once), a local file, or random.")
@click.option("--encoder-depth", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --encoder: stages or blocks kept (0: all), as model.encoder_depth.")
@click.option("--class-token", default="drop", show_default=True, type=click.Choice(("drop", "keep")),
              help="With --encoder: a ViT's class token in the features or not, as model.class_token.")
@click.option("--image-size", type=click.IntRange(min=16), help="With --encoder: input size (default: native).")
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(tuple(DTYPES)),
              help="How the features are stored.")
@click.option("--flip", is_flag=True, help="Also store each image's mirror view (training draws one per sample).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass over all processes.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Decode threads per process (0: all cores / processes of this node).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(("auto", "bf16", "fp16", "fp32")),
              help="Autocast of the trunk: auto = bf16 on CUDA, fp32 on the CPU.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES))
@click.option("--nproc", default=0, type=click.IntRange(min=0),
              help="Launch this many processes on this machine (torchrun --nproc_per_node).")
def command(data_dir, name, splits, source, encoder, encoder_weights, encoder_depth, class_token, image_size, dtype,
            flip, batch_size, workers, precision, device, nproc):
    """Compute a frozen trunk's features of DATA's splits once, for training with that trunk frozen
    (data.features = NAME, encoder_trainable_from_epoch = -1): no JPEG decoded, no trunk run per step.
    Progress as for every long command; killed, a rerun completes what is missing."""
    if nproc > 1:
        from capfast.common.signals import DEFAULT_STOP_SIGNALS

        sys.exit(distributed.launch(nproc, _argv_without_nproc(click.get_current_context()), DEFAULT_STOP_SIGNALS))
    problem = feature_cache.name_problem(name)
    if problem or not name:
        raise CapfastError(f"--name must be {problem or 'a folder name under DATA/features'}, got {name!r}")
    model = trunk_model(source, encoder, encoder_weights, encoder_depth, class_token, image_size)
    device, dist = distributed.setup(device)
    try:
        extraction = Extraction(Path(data_dir), name, dtype, flip, batch_size, workers, precision)
        extract(extraction, model, list(dict.fromkeys(splits)), device, dist)
    finally:
        distributed.shutdown()
