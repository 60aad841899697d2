"""`capfast bench features`: training from a frozen trunk's cached features against the same training with the
frozen trunk run on the fly, each with its real loader, in one process (machine noise hits both alike).

For each recipe the trunk gets random weights (nothing is downloaded; the arithmetic is the pretrained one's), its
features of the data's train split are cached (`capfast features`, fp16, timed: images/s), and the same recipe
trains both ways from the same weights: optimizer steps per second (rounds interleaved, the best of each counts),
and one SCST epoch's time. The data is made here unless --data is given: `capfast synth --textured` images
(photo-like JPEGs) whose captions are encoded with a vocabulary padded to --vocab-size words, since the decoder's
output layer over a COCO-sized vocabulary is most of what remains of a step from the cache.
"""

import contextlib
import json
import tempfile
import time
from pathlib import Path

import click

from capfast.bench.train import _endless_epochs, _steps_per_sec, _synchronize

RECIPES = {  # name: (recipe file in configs/, overrides)
    "demo": ("cpu_smoke.toml", []),
    "r50": ("coco_r50_transformer.toml", ["model.encoder_weights=\"random\""]),
    "vitb16": ("coco_vitb16_transformer.toml", ["model.encoder_weights=\"random\""]),
}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def make_data(root: Path, images: int, vocab_size: int) -> Path:
    """A converted train split of `images` photo-like 256² JPEGs, its captions encoded with a vocabulary of
    `vocab_size` words (the synthetic captions' words first, then filler words no caption uses)."""
    from capfast.pack.convert import convert
    from capfast.pack.synth import make_synthetic_coco
    from capfast.store.vocab import Vocab

    make_synthetic_coco(root / "coco", n_train=images, n_val=0, seed=0, texture=True, square=True)
    captions = json.loads((root / "coco" / "annotations" / "captions_train.json").read_text())["annotations"]
    words = Vocab.build([c["caption"].lower().replace(".", "").split() for c in captions], min_count=1).words
    filler = tuple(f"word{i}" for i in range(max(0, vocab_size - len(words))))
    Vocab(words + filler).save(root / "vocab.json")
    convert(root / "data", "train", annotations=root / "coco" / "annotations" / "captions_train.json",
            images=root / "coco" / "images" / "train", image_size=256, vocab=root / "vocab.json", progress=False)
    return root / "data"


def trainers(recipe: str, data_dir: Path, work: Path, batch_size: int, overrides: list[str]) -> dict:
    """The recipe's model with a random frozen trunk, its features cached, and three Trainers from the same
    weights: "fly" (trunk on the fly), "cache" (data.features), "scst_fly"/"scst_cache" (objective = scst)."""
    from capfast.extract.features import Extraction, extract
    from capfast.models import checkpoint
    from capfast.models.record import ModelRecord
    from capfast.train.config import load_config
    from capfast.train.trainer import Trainer

    path, extra = RECIPES[recipe]
    common = [*extra, "encoder_trainable_from_epoch=-1", f"data.batch_size={batch_size}", "eval.every_epochs=0",
              "checkpoint_every=0", "compile=false", "progress_seconds=3600", *overrides]

    def trainer(name, *more):
        return Trainer(load_config(CONFIGS / path, [*common, *more]), data_dir, work / name)

    start = trainer("start")
    if start.device.type == "cpu" and start.cfg.precision == "bf16":  # bf16 autocast is slower than fp32 there
        common.append("precision=\"fp32\"")
    checkpoint.save({"model": ModelRecord.of(start.model, start.vocab).state_dict()}, work / "start.pt")
    began = time.perf_counter()
    extract(Extraction(data_dir, f"bench-{recipe}", batch_size=batch_size, progress_seconds=3600),
            start.model, ["train"], start.device, start.dist)
    extraction_s = time.perf_counter() - began
    init = f"init_from=\"{work / 'start.pt'}\""
    cache = f"data.features=\"bench-{recipe}\""
    scst = ["objective=\"scst\"", "optim.warmup_steps=0", "scst.samples=5"]
    return {"fly": trainer("fly", init), "cache": trainer("cache", init, cache),
            "scst_fly": trainer("scst_fly", init, *scst), "scst_cache": trainer("scst_cache", init, cache, *scst),
            "extraction_s": extraction_s, "images": len(start.train_loader.rank_order(0))}


def steps_per_sec(trainer, steps: int, warmup: int) -> float:
    trainer._set_encoder_trainable(0)
    return _steps_per_sec(trainer, _endless_epochs(trainer.train_loader), steps, warmup)


def read_img_s(trainer, batches: int) -> float:
    """The cache's read rate: its loader's batches with nothing consuming them (on CUDA, on the device)."""
    with contextlib.closing(iter(_endless_epochs(trainer.train_loader))) as source:
        next(source)
        began = time.perf_counter()
        images = sum(len(next(source).image_ids) for _ in range(batches))
        _synchronize(trainer.device)
    return images * trainer.dist.world_size / (time.perf_counter() - began)


def epoch_seconds(trainer) -> float:
    """One epoch of optimizer steps over the real loader, after one untimed step."""
    return trainer.steps_per_epoch / steps_per_sec(trainer, trainer.steps_per_epoch, warmup=1)


def measure(recipe: str, data_dir: Path, batch_size: int, steps: int, warmup: int, rounds: int,
            overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as work:
        made = trainers(recipe, data_dir, Path(work), batch_size, overrides)
        fly, cache = [], []
        for _ in range(rounds):  # interleaved: load that comes and goes hits both
            fly.append(steps_per_sec(made["fly"], steps, warmup))
            cache.append(steps_per_sec(made["cache"], steps, warmup))
        read = read_img_s(made["cache"], steps)
        scst_fly = min(epoch_seconds(made["scst_fly"]) for _ in range(rounds))
        scst_cache = min(epoch_seconds(made["scst_cache"]) for _ in range(rounds))
    return {"fly_steps_s": max(fly), "cache_steps_s": max(cache), "ratio": max(cache) / max(fly),
            "read_img_s": read, "consumed_img_s": max(cache) * batch_size,
            "scst_fly_s": scst_fly, "scst_cache_s": scst_cache, "scst_ratio": scst_fly / scst_cache,
            "features_img_s": made["images"] / made["extraction_s"]}


@click.command()
@click.option("--recipes", default="demo,r50,vitb16", show_default=True,
              help=f"Comma-separated, of: {', '.join(RECIPES)} (configs/ recipes, trunk frozen, random weights).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="A converted data dir with a train split (default: made here, see --images, --vocab-size).")
@click.option("--images", default=128, show_default=True, help="Images of the data made here.")
@click.option("--vocab-size", default=10_000, show_default=True, help="Vocabulary of the data made here (COCO: ~10k).")
@click.option("--batch-size", default=16, show_default=True, help="Images per step.")
@click.option("--steps", default=8, show_default=True, help="Timed steps per measurement.")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps first.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1),
              help="Interleaved runs of each way; the best counts.")
@click.argument("overrides", nargs=-1)
def command(recipes, data_dir, images, vocab_size, batch_size, steps, warmup, rounds, overrides):
    """Train steps/s from a feature cache ÷ with the frozen trunk on the fly (both with their real loaders), and
    an SCST epoch's time both ways, per recipe. Extra arguments override every recipe (`precision=bf16`)."""
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        raise click.UsageError(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    with tempfile.TemporaryDirectory() as made:
        if data_dir is None:
            data_dir = make_data(Path(made), images, vocab_size)
        line = []
        for name in names:
            r = measure(name, Path(data_dir), batch_size, steps, warmup, rounds, list(overrides))
            click.echo(f"{name:7s} train: on the fly {r['fly_steps_s']:7.2f} steps/s, from the cache "
                       f"{r['cache_steps_s']:7.2f} steps/s: {r['ratio']:.2f}x   SCST epoch: {r['scst_fly_s']:6.1f} s "
                       f"vs {r['scst_cache_s']:6.1f} s: {r['scst_ratio']:.2f}x")
            click.echo(f"{'':7s} features made at {r['features_img_s']:.1f} img/s; the cache reads "
                       f"{r['read_img_s']:,.0f} img/s, training from it consumes {r['consumed_img_s']:,.1f} img/s")
            line.append(f"{name}_ratio={r['ratio']:.2f} {name}_scst_ratio={r['scst_ratio']:.2f}")
    click.echo(" ".join(line))
