"""`capfast eval`: decode a split with a checkpoint and score it like the COCO caption server.

Under torchrun each rank decodes its shard of the split; rank 0 gathers the captions and scores them.
"""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from capfast import progress, schema
from capfast.errors import CapfastError

@dataclass
class Report:
    metrics: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)          # image id -> generated caption
    sample_images: list = field(default_factory=list)    # [3,H,W] float in [0,1], for TensorBoard
    sample_captions: list = field(default_factory=list)


@torch.inference_mode()
def decode_split(model, loader, vocab, *, beam_size=3, max_len=20, max_images=0, amp_dtype=None,
                 keep_samples=4, progress_seconds=progress.DEFAULT_SECONDS) -> Report:
    """This rank's captions for its shard of the loader's split."""
    model.eval()
    report = Report()
    batches = loader.epoch(0)
    with contextlib.closing(batches):  # stopping early must also stop ffcv's prefetch thread
        for batch in progress.track(batches, len(loader), "val", "batch", progress_seconds):
            captions = caption_batch(model, batch.images, vocab, beam_size, max_len, amp_dtype)
            report.results.update(zip(batch.image_ids.tolist(), captions))
            take = keep_samples - len(report.sample_images)
            if take > 0:
                report.sample_images += list(_denormalize(batch.images[:take]))
                report.sample_captions += captions[:take]
            if max_images and len(report.results) >= max_images:
                break
    return report


def caption_batch(model, images: torch.Tensor, vocab, beam_size: int, max_len: int, amp_dtype=None) -> list[str]:
    """One caption per image of a preprocessed batch."""
    from capfast.decoding import generate
    from capfast.train.precision import autocast_context

    with autocast_context(images.device, amp_dtype):
        tokens, _ = generate(model, images, beam_size=beam_size, max_len=max_len)
    return [vocab.decode(row) for row in tokens.tolist()]


def evaluate_model(model, loader, vocab, refs_file: Path, *, beam_size=3, max_len=20, max_images=0, amp_dtype=None,
                   ptb_java=False, meteor="auto", progress_seconds=progress.DEFAULT_SECONDS) -> Report:
    """Decodes on every rank, gathers on rank 0 and scores there (other ranks get empty metrics)."""
    report = decode_split(model, loader, vocab, beam_size=beam_size, max_len=max_len,
                          max_images=max_images, amp_dtype=amp_dtype, progress_seconds=progress_seconds)
    report.results = _gather_results(report.results)
    if report.results is None:
        return Report()
    from capfast.metrics import score

    references = load_references(refs_file)
    references = {i: references[i] for i in report.results if i in references}
    report.metrics = score(report.results, references, ptb_java=ptb_java, meteor=meteor)
    return report


def load_references(refs_file: Path) -> dict[int, list[str]]:
    from capfast.io import read_json

    raw = read_json(refs_file, "reference captions (written by `capfast convert`)")
    return {int(k): v for k, v in raw.items()}


def _gather_results(results: dict):
    """All ranks' results merged on rank 0; None on the other ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return results
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def _denormalize(images: torch.Tensor) -> torch.Tensor:
    """The loader's normalized images back to [0, 1], for TensorBoard."""
    from capfast.data.augment import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).cpu()


@click.command()
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(path_type=Path),
              help="A checkpoint written by `capfast train` (best.pt or last.pt).")
@click.option("--data", "beton", required=True, type=click.Path(path_type=Path),
              help="The split to score, e.g. data/coco/val.beton (refs_val.json must sit beside it).")
@click.option("--beam", "beam_size", default=3, show_default=True, help="Beam size; 1 = greedy.")
@click.option("--max-len", default=20, show_default=True, help="Longest generated caption, in tokens.")
@click.option("--batch-size", default=64, show_default=True, help="Images per decoding batch (per process).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the metrics as one JSON object.")
@click.option("--results", "results_out", type=click.Path(path_type=Path),
              help="Write the captions in COCO results format: [{image_id, caption}].")
@click.option("--ptb-java", is_flag=True, help="Tokenize with the official Java PTBTokenizer (needs java).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def command(checkpoint_path, beton, beam_size, max_len, batch_size, json_out, results_out, ptb_java, device):
    """Score a checkpoint on a converted split: BLEU-1..4, METEOR (when Java is present), ROUGE-L, CIDEr."""
    from capfast.checkpoint import load_model
    from capfast.data import build_loader
    from capfast.train import distributed
    from capfast.train.data_check import check_vocab_matches
    from capfast.train.precision import resolve_device
    from capfast.vocab import Vocab

    if beam_size < 1:
        raise CapfastError("--beam must be at least 1")
    device = resolve_device(device)
    dist_info = distributed.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    try:
        if not Path(beton).is_file():
            raise CapfastError(f"data file not found: {beton}")
        model, vocab, state = load_model(checkpoint_path, device)
        data_dir, split = Path(beton).parent, Path(beton).stem
        data_vocab_file = data_dir / schema.VOCAB_FILE
        if data_vocab_file.exists() and Vocab.load(data_vocab_file).words != vocab.words:
            raise CapfastError(f"{checkpoint_path} was trained with a different vocabulary than {data_vocab_file}")
        if data_vocab_file.exists():
            check_vocab_matches(data_dir, split, vocab)
        loader = build_loader(beton, batch_size=batch_size, train=False, device=device,
                              image_size=state["image_size"], distributed=dist_info.enabled)
        report = evaluate_model(model, loader, vocab, schema.refs_path(data_dir, split), beam_size=beam_size,
                                max_len=max_len, ptb_java=ptb_java)
        if dist_info.is_main:
            _print_and_write(report, json_out, results_out)
    finally:
        distributed.shutdown()


def _print_and_write(report: Report, json_out, results_out) -> None:
    from capfast.io import atomic_write_text
    from capfast.metrics import write_results

    click.echo(f"{len(report.results)} images")
    for name, value in report.metrics.items():
        click.echo(f"{name:8s} {value:.4f}")
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(report.metrics, indent=2))
    if results_out:
        write_results(report.results, Path(results_out))
