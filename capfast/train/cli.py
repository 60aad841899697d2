"""`capfast train`: resolve the config, check and lock the run directory, run the Trainer (or launch N of them)."""

import json
import os
import sys
from pathlib import Path

import click

from capfast.common.io import atomic_write_text, ensure_writable_dir
from capfast.common.signals import EXIT_STOPPED
from capfast.errors import CapfastError


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="TOML recipe, e.g. configs/cpu_smoke.toml.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by `capfast convert` (train.beton, vocab.json, ...).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory: checkpoints (last.pt, best.pt, checkpoints/), TensorBoard logs (tb/), "
                   "config.json (the config in use, with the settings each --resume changed under \"history\").")
@click.option("--resume", is_flag=True,
              help="Continue from OUT/last.pt exactly where it stopped. Overrides that would change the data "
                   "order, batches, crops or model are refused; others (epochs, lr, eval, logging) apply.")
@click.option("--auto-resume", is_flag=True,
              help="--resume when OUT holds a checkpoint, else start: for torchrun --max-restarts and jobs a "
                   "scheduler requeues.")
@click.option("--nproc", type=int, default=0,
              help="Launch this many DDP processes on this machine (same as torchrun --nproc_per_node).")
@click.argument("overrides", nargs=-1)
def command(config_path, data_dir, out_dir, resume, auto_resume, nproc, overrides):
    """Train a captioner. Extra arguments override the recipe: `optim.lr=1e-4 epochs=3 model.decoder=lstm`.

    Runs on one process by default; under `torchrun` each process trains a shard (NCCL on GPUs, gloo on CPU).
    Progress goes to stdout: a bar on a terminal, else a line at most every `progress_seconds` (default 30).
    Watch it with `tensorboard --logdir OUT/tb`: Custom Scalars (throughput, data wait, loss) and HParams.
    SIGTERM, SIGINT or SIGUSR1 (`stop_signals`) stop it after the step all ranks agree on, with last.pt
    saved and exit code 75.
    """
    from capfast.train.config import load_config

    cfg = load_config(config_path, list(overrides))
    if nproc > 1:
        from capfast.common.launch import launch

        argv = ["train", "--config", str(config_path), "--data", str(data_dir), "--out", str(out_dir),
                *(["--resume"] if resume else []), *(["--auto-resume"] if auto_resume else []), *overrides]
        sys.exit(launch(nproc, argv, cfg.stop_signals))
    if int(os.environ.get("RANK", "0")) != 0:
        return run(cfg, data_dir, out_dir, resumes(out_dir, resume, auto_resume))
    from capfast.common.lock import RunLock
    from capfast.models.run_dir import RunDir

    ensure_writable_dir(out_dir, "--out")
    with RunLock(out_dir):
        RunDir(out_dir).remove_stale_temporaries()
        last = out_dir / "last.pt"
        resume = resumes(out_dir, resume, auto_resume)
        if resume and not last.is_file():
            raise CapfastError(f"--resume: no checkpoint at {last}")
        if not resume and last.exists():
            raise CapfastError(f"{out_dir} already holds a run: pass --resume to continue it or choose another --out")
        run(cfg, data_dir, out_dir, resume)


def resumes(out_dir: Path, resume: bool, auto_resume: bool) -> bool:
    """Every rank's one answer: --resume always resumes; --auto-resume resumes when OUT holds last.pt."""
    return resume or (auto_resume and (out_dir / "last.pt").exists())


def run(cfg, data_dir: Path, out_dir: Path, resume: bool) -> None:
    from capfast.common import distributed
    from capfast.common.signals import StopRequest
    from capfast.train.resume import describe
    from capfast.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, data_dir, out_dir, resume=resume)
        if trainer.dist.is_main:
            if trainer.config_changes:
                click.echo(f"capfast: note: resuming at step {trainer.state.step} with changed settings: "
                           f"{describe(trainer.config_changes)}", err=True)
            run_config = {**trainer.state.config, "history": trainer.state.config_history}
            atomic_write_text(out_dir / "config.json", json.dumps(run_config, indent=2))
        # Only while it trains: before that a signal ends the process at once, as it has nothing to save.
        try:
            with StopRequest(cfg.stop_signals) as stop:
                trainer.stop = stop
                summary = trainer.train()
        except RuntimeError:  # a collective failed, maybe as another rank ended: named outside StopRequest, so
            lost = lost_peer(trainer)  # that torchrun's SIGTERM for a restart ends this process at once
            if lost is None:
                raise
            raise lost from None
        if summary["stopped"]:
            if trainer.dist.is_main:
                why = stop.signal or "a stop signal to another rank"
                click.echo(f"capfast: stopped by {why} at step {summary['step']}: {out_dir / 'last.pt'} saved; "
                           f"--resume continues from there", err=True)
            sys.exit(EXIT_STOPPED)
        if trainer.dist.is_main:
            click.echo(f"done: {summary['step']} steps, {summary['epoch']} epochs; checkpoints in {out_dir}")
            worse = worse_than_best(summary, out_dir)
            if worse:
                click.echo(worse, err=True)
    finally:
        distributed.shutdown()


def lost_peer(trainer):
    """The PeerLost error naming the rank whose end failed this rank's collective, or None."""
    return trainer.stall.lost_peer() if trainer.stall is not None else None


def worse_than_best(summary: dict, out_dir: Path) -> str:
    """The one-line note for a run whose final validation is below its best (the start's included), or ''."""
    last, best = summary["last_cider"], summary["best_cider"]
    if last is None or not last < best:
        return ""
    return (f"capfast: note: the final model's val CIDEr {last:.3f} is below the best, {best:.3f}: "
            f"{out_dir / 'best.pt'} holds that one")
