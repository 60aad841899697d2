"""`capfast bench train`: train-step throughput with the real loader vs a device-resident synthetic batch.

Data-loader efficiency = real ÷ synthetic: 1.0 means the model never waits for data. Both runs use the same
Trainer, model and optimizer step, in one process, so machine noise hits both alike.
"""

import contextlib
import itertools
import tempfile
import time
from pathlib import Path

import click


def _steps_per_sec(trainer, batches, steps: int, warmup: int) -> float:
    """The optimizer step returns before the GPU has run it (the loss stays on the device), so the timed region
    starts and ends with the device idle: what is timed is the work done, not the work queued."""
    with contextlib.closing(iter(batches)) as iterator:
        for _ in range(warmup):
            trainer._optimizer_step([next(iterator)])
        _synchronize(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer._optimizer_step([next(iterator)])
        _synchronize(trainer.device)
        return steps / (time.perf_counter() - start)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forever(batch):
    while True:
        yield batch


def _endless_epochs(loader):
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def measure(cfg, data_dir: Path, steps: int, warmup: int) -> dict:
    from capfast.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, data_dir, Path(out))
        trainer._set_encoder_trainable(0)
        global_batch = cfg.data.batch_size
        real = _steps_per_sec(trainer, _endless_epochs(trainer.train_loader), steps, warmup) * global_batch
        with contextlib.closing(trainer.train_loader.epoch(0)) as first_epoch:
            resident = next(first_epoch)
        synthetic = _steps_per_sec(trainer, _forever(resident), steps, warmup) * global_batch
    return {"real_img_s": real, "synthetic_img_s": synthetic, "efficiency": real / synthetic,
            "is_main": trainer.dist.is_main}


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="TOML recipe.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Converted data dir.")
@click.option("--steps", default=30, show_default=True, help="Timed steps per measurement.")
@click.option("--warmup", default=5, show_default=True, help="Untimed steps first (cudnn autotune, compile).")
@click.option("--matrix", is_flag=True,
              help="Also fp32 / bf16 / bf16+compile rows, and ResNet-18 bf16 / bf16+compile rows (GPU).")
@click.argument("overrides", nargs=-1)
def command(config_path, data_dir, steps, warmup, matrix, overrides):
    """Measure train img/s with the real loader and with a synthetic batch; print the efficiency.
    Run under `torchrun --nproc_per_node N` for DDP figures (img/s are global)."""
    from capfast.train.config import load_config

    variants = [("recipe", [])]
    if matrix:
        variants += [("fp32", ["precision=fp32", "compile=false"]), ("bf16", ["precision=bf16", "compile=false"]),
                     ("bf16+compile", ["precision=bf16", "compile=true"]),
                     ("r18 bf16", ["model.encoder=resnet18", "precision=bf16", "compile=false"]),
                     ("r18 bf16+compile", ["model.encoder=resnet18", "precision=bf16", "compile=true"])]
    rows = []
    for name, extra in variants:
        cfg = load_config(config_path, [*overrides, *extra])
        result = measure(cfg, data_dir, steps, warmup)
        rows.append((name, result))
        if result["is_main"]:
            click.echo(f"{name:16s} real {result['real_img_s']:9.1f} img/s   synthetic "
                       f"{result['synthetic_img_s']:9.1f} img/s   efficiency {result['efficiency']:.3f}")
    name, first = rows[0]
    if first["is_main"]:
        click.echo(f"capfast_img_s={first['real_img_s']:.1f} baseline_img_s={first['synthetic_img_s']:.1f} "
                   f"ratio={first['efficiency']:.3f}")
