"""`capfast eval`: generate captions for a split with a checkpoint and score them like the COCO caption server.

Under torchrun each rank captions its shard of the split; rank 0 gathers the captions and scores them.
"""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from capfast.common import progress
from capfast.common.options import default
from capfast.data import LoaderOptions
from capfast.eval.cli_options import checked_by, generation_options
from capfast.models.generate import GenerationOptions
from capfast.store import schema
from capfast.store.references import load_references


@dataclass
class Report:
    metrics: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)          # image id -> generated caption
    sample_captions: list = field(default_factory=list)  # the first few, for TensorBoard
    sample_images: list = field(default_factory=list)    # their images, [3,H,W] float in [0,1] (none from a cache)


@torch.inference_mode()
def generate_split(model, loader, vocab, *, generation: GenerationOptions, max_images=0, amp_dtype=None,
                   keep_samples=4, progress_seconds=progress.DEFAULT_SECONDS) -> Report:
    """This rank's captions for its shard of the loader's split; with max_images, this rank's share of them."""
    model.eval()
    report = Report()
    limit = rank_share(max_images, loader.shard.rank, loader.shard.world_size) if max_images else None
    if limit == 0:
        return report
    batches = loader.epoch(0)
    with contextlib.closing(batches):  # stopping early must also stop ffcv's prefetch thread
        for batch in progress.track(batches, len(loader), "val", "batch", progress_seconds):
            images, image_ids = batch.images, batch.image_ids
            if limit is not None:
                images, image_ids = images[:limit - len(report.results)], image_ids[:limit - len(report.results)]
            captions = caption_batch(model, images, vocab, generation, amp_dtype)
            report.results.update(zip(image_ids.tolist(), captions))
            take = keep_samples - len(report.sample_captions)
            if take > 0:
                report.sample_captions += captions[:take]
                if loader.yields_images:  # a feature cache's batches hold no image to show
                    report.sample_images += list(_denormalize(images[:take], loader.settings.normalization))
            if limit is not None and len(report.results) >= limit:
                break
    return report


def rank_share(max_images: int, rank: int, world_size: int) -> int:
    """How many of `max_images` images rank `rank` scores: the shares of all ranks add up to max_images."""
    return max_images // world_size + (rank < max_images % world_size)


def caption_batch(model, images: torch.Tensor, vocab, generation: GenerationOptions, amp_dtype=None) -> list[str]:
    """One caption per image of a preprocessed batch."""
    from capfast.common.precision import autocast_context
    from capfast.models.generate import generate

    with autocast_context(images.device, amp_dtype):
        tokens, _ = generate(model, images, beam_size=generation.beam_size, max_len=generation.max_len)
    return [vocab.decode(row) for row in tokens.tolist()]


def evaluate_model(model, loader, vocab, refs_file: Path, *, generation: GenerationOptions, max_images=0,
                   amp_dtype=None, ptb_java=False, meteor="auto", attributes_file=None, blind=False,
                   progress_seconds=progress.DEFAULT_SECONDS) -> Report:
    """Generates on every rank, gathers on rank 0 and scores there (other ranks get empty metrics).

    attributes_file (attributes_SPLIT.json of `capfast synth` data): adds accuracy/color, /shape, /position.
    blind=True adds the same metrics as "blind/..." for the same model shown a blank image instead of each
    image: what it says without looking, the chance level of every score."""
    report = generate_split(model, loader, vocab, generation=generation, max_images=max_images, amp_dtype=amp_dtype,
                            progress_seconds=progress_seconds)
    report.results = _gather_results(report.results)
    if report.results is None:
        return Report()
    references = load_references(refs_file)
    references = {i: references[i] for i in report.results if i in references}
    attributes = _load_attributes(attributes_file)
    report.metrics = _scores(report.results, references, attributes, ptb_java=ptb_java, meteor=meteor)
    if blind:
        caption = blind_caption(model, vocab, loader.settings.image_size, loader.settings.dtype, generation,
                                amp_dtype)
        blind_results = dict.fromkeys(report.results, caption)
        scores = _scores(blind_results, references, attributes, ptb_java=ptb_java, meteor=False)
        report.metrics.update({f"blind/{k}": v for k, v in scores.items()})
    return report


def _scores(results: dict, references: dict, attributes: dict | None, **score_options) -> dict:
    from capfast.eval.attributes import attribute_accuracy
    from capfast.eval.metrics import score

    metrics = score(results, references, **score_options)
    if attributes:
        metrics.update(attribute_accuracy(results, attributes))
    return metrics


def _load_attributes(path):
    if path is None or not Path(path).is_file():
        return None
    from capfast.eval.attributes import load_attributes

    return load_attributes(path)


@torch.inference_mode()
def blind_caption(model, vocab, image_size: int, dtype, generation: GenerationOptions, amp_dtype=None) -> str:
    """The caption the model gives a blank image: the encoder's mean colour (all zeros after its normalization).
    Generation is per image, so every image blanked would get this same caption."""
    device = next(model.parameters()).device
    blank = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    model.eval()
    return caption_batch(model, blank, vocab, generation, amp_dtype)[0]


def _gather_results(results: dict):
    """All ranks' results merged on rank 0; None on the other ranks."""
    from capfast.common.distributed import gather_object

    gathered = gather_object(results, dst=0)
    if gathered is None:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def _denormalize(images: torch.Tensor, normalization) -> torch.Tensor:
    """The loader's normalized images back to [0, 1], for TensorBoard."""
    mean = torch.tensor(normalization.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).cpu()


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by `capfast convert`, as for `capfast train`.")
@click.option("--split", default="val", show_default=True,
              help="The split to score: DATA/SPLIT.beton, with refs_SPLIT.json beside it.")
@generation_options
@click.option("--batch-size", type=int, default=default(LoaderOptions, "batch_size"), show_default=True,
              callback=checked_by(LoaderOptions), help="Images per generation step over all processes.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the metrics as one JSON object.")
@click.option("--results", "results_out", type=click.Path(path_type=Path),
              help="Write the captions in COCO results format: [{image_id, caption}].")
@click.option("--ptb-java", is_flag=True, help="Tokenize with the official Java PTBTokenizer (needs java).")
@click.option("--meteor/--no-meteor", default=True, show_default=True,
              help="Score METEOR when `java` is on PATH (meteor-1.5.jar takes ~10 s to start).")
@click.option("--max-images", default=0, show_default=True, type=click.IntRange(min=0),
              help="Score only this many images (over all processes); 0 = the whole split.")
@click.option("--blind/--no-blind", default=True, show_default=True,
              help="Also score the same model shown a blank image: the level it reaches without looking.")
def command(data_dir, split, checkpoint_path, beam_size, max_len, device, batch_size, json_out, results_out,
            ptb_java, meteor, max_images, blind):
    """Score a checkpoint on a converted split: BLEU-1..4, METEOR (when Java is present), ROUGE-L, CIDEr;
    on `capfast synth` data also how often the caption names each shape's color, kind and position right.
    The "blind" column is the same model given a blank image instead of each image."""
    from capfast.common import distributed
    from capfast.data import build_loader
    from capfast.models.load import load_model
    from capfast.store.checks import check_split_vocab, require_split
    from capfast.store.references import require_references

    device, dist_info = distributed.setup(device)
    try:
        beton = require_split(data_dir, split)
        refs_file = require_references(data_dir, split, "capfast eval")  # before anything is decoded
        model, record = load_model(checkpoint_path, device)
        vocab = record.vocab
        check_split_vocab(data_dir, split, vocab, what=f"checkpoint {checkpoint_path}")
        options = LoaderOptions(batch_size=batch_size, image_size=model.image_size)
        loader = build_loader(beton, options, train=False, device=device, distributed=dist_info.enabled,
                              normalization=model.normalization, vocab_size=len(vocab))
        report = evaluate_model(model, loader, vocab, refs_file,
                                generation=GenerationOptions(beam_size=beam_size, max_len=max_len),
                                max_images=max_images, ptb_java=ptb_java, meteor="auto" if meteor else False,
                                attributes_file=schema.attributes_path(data_dir, split), blind=blind)
        if dist_info.is_main:
            _print_and_write(report, json_out, results_out)
    finally:
        distributed.shutdown()


def _print_and_write(report: Report, json_out, results_out) -> None:
    from capfast.common.io import atomic_write_text
    from capfast.eval.metrics import write_results

    click.echo(f"{len(report.results)} images")
    blind = any(name.startswith("blind/") for name in report.metrics)
    if blind:
        click.echo(f"{'':18s} {'model':>7s} {'blind':>7s}")
    for name, value in report.metrics.items():
        if not name.startswith("blind/"):
            blind_value = report.metrics.get(f"blind/{name}")
            shown = f" {blind_value:7.4f}" if blind_value is not None else ""
            click.echo(f"{name:18s} {value:7.4f}{shown}")
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(report.metrics, indent=2))
    if results_out:
        write_results(report.results, Path(results_out))
