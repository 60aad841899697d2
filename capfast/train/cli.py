"""`capfast train`: resolve the config, check the run directory, run the Trainer (or launch N of them)."""

import json
import sys
from pathlib import Path

import click

from capfast.common.io import atomic_write_text
from capfast.errors import CapfastError


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="TOML recipe, e.g. configs/cpu_smoke.toml.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by `capfast convert` (train.beton, vocab.json, ...).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory: checkpoints (last.pt, best.pt), TensorBoard logs (tb/), config.json (the "
                   "config in use, with the settings each --resume changed under \"history\").")
@click.option("--resume", is_flag=True,
              help="Continue from OUT/last.pt exactly where it stopped. Overrides that would change the data "
                   "order, batches, crops or model are refused; others (epochs, lr, eval, logging) apply.")
@click.option("--nproc", type=int, default=0,
              help="Launch this many DDP processes on this machine (same as torchrun --nproc_per_node).")
@click.argument("overrides", nargs=-1)
def command(config_path, data_dir, out_dir, resume, nproc, overrides):
    """Train a captioner. Extra arguments override the recipe: `optim.lr=1e-4 epochs=3 model.decoder=lstm`.

    Runs on one process by default; under `torchrun` each process trains a shard (NCCL on GPUs, gloo on CPU).
    Progress goes to stdout: a bar on a terminal, else a line at most every `progress_seconds` (default 30).
    Watch it with `tensorboard --logdir OUT/tb`: Custom Scalars (throughput, data wait, loss) and HParams.
    """
    from capfast.train.config import load_config, to_dict

    cfg = load_config(config_path, list(overrides))
    if nproc > 1:
        from capfast.common.distributed import launch

        argv = ["train", "--config", str(config_path), "--data", str(data_dir), "--out", str(out_dir),
                *(["--resume"] if resume else []), *overrides]
        sys.exit(launch(nproc, argv))
    last = out_dir / "last.pt"
    if resume and not last.is_file():
        raise CapfastError(f"--resume: no checkpoint at {last}")
    if not resume and last.exists():
        raise CapfastError(f"{out_dir} already holds a run: pass --resume to continue it or choose another --out")

    from capfast.common import distributed
    from capfast.train.resume import describe
    from capfast.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, data_dir, out_dir, resume=resume)
        if trainer.dist.is_main:
            if trainer.config_changes:
                click.echo(f"capfast: note: resuming at step {trainer.step} with changed settings: "
                           f"{describe(trainer.config_changes)}", err=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            run_config = {**to_dict(cfg), "history": trainer.config_history}
            atomic_write_text(out_dir / "config.json", json.dumps(run_config, indent=2))
        summary = trainer.train()
        if trainer.dist.is_main:
            click.echo(f"done: {summary['step']} steps, {summary['epoch']} epochs; checkpoints in {out_dir}")
    finally:
        distributed.shutdown()

