"""The train step's statistics are read late without a host sync: StepLog's bounded lag, and on a GPU the
steady-state train steps under torch.cuda.set_sync_debug_mode("error")."""

import contextlib
from pathlib import Path

import pytest
import torch
from test_train import TINY

from capfast.train.config import load_config
from capfast.train.step_log import StepLog

ROOT = Path(__file__).resolve().parents[1]


class GpuTimeline:
    """Stands in for CUDA events, which the CPU lacks: the test says how far the 'GPU' has got."""

    def __init__(self):
        self.reached, self.recorded, self.waited = 0, 0, []

    def mark(self):
        self.recorded += 1
        return Mark(self, self.recorded)


class Mark:
    def __init__(self, timeline: GpuTimeline, index: int):
        self.timeline, self.index = timeline, index

    def done(self) -> bool:
        return self.timeline.reached >= self.index

    def wait(self) -> None:
        self.timeline.waited.append(self.index)
        self.timeline.reached = max(self.timeline.reached, self.index)

    def seconds_since(self, start: "Mark") -> float:
        return float(self.index - start.index)


def test_steps_come_out_in_order_once_done_and_never_more_than_depth_behind():
    timeline = GpuTimeline()
    log = StepLog(torch.device("cpu"), depth=2)
    log.mark = timeline.mark
    out = []
    for step in range(1, 6):
        start = log.mark()
        log.push(start, {"step": step}, {"loss": torch.tensor(step / 4)})
        out += log.ready()
        assert len(log.pending) <= 2
    # Nothing finished on its own, so each step beyond the second waited for the oldest (the one lagged read).
    assert [r["step"] for r in out] == [1, 2, 3]
    assert timeline.waited == [2, 4, 6]  # each step's end mark; starts are odd, ends even
    timeline.reached = 8  # the 'GPU' finished step 4 only: it comes out without waiting
    assert [r["step"] for r in log.ready()] == [4] and timeline.waited == [2, 4, 6]
    assert [(r["step"], r["loss"], r["step_time"]) for r in log.drain()] == [(5, 1.25, 1.0)]
    assert timeline.waited == [2, 4, 6, 10] and not log.pending
    assert out[0] == {"step": 1, "loss": 0.25, "step_time": 1.0}


@contextlib.contextmanager
def sync_debug_mode(mode):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [["precision=bf16"], ["precision=fp32"], ["precision=bf16", "optim.grad_accum=2"],
                                       ["precision=bf16", "model.decoder=lstm"]], ids=lambda o: ",".join(o))
def test_steady_state_train_steps_never_wait_for_the_gpu(converted, tmp_path, tb_scalars, overrides):
    """The real loop (_run_steps) on resident batches, the loader left out: its own syncs are its business, and
    sync debug mode is process-wide. Only StepLog's deliberate lagged wait is let through."""
    from capfast.train.reporter import Reporter
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [*TINY, "device=cuda", "data.batch_size=4", "epochs=10",
                                                            *overrides])
    trainer = Trainer(cfg, converted, tmp_path / "run")
    trainer._set_encoder_trainable(0)
    with contextlib.closing(trainer.train_loader.epoch(0)) as epoch:
        batches = [next(epoch) for _ in range(8)]
    lagged_wait = trainer.step_log._wait
    trainer.step_log._wait = lambda mark: _permitted(lagged_wait, mark)
    reporter = Reporter(tmp_path / "run" / "tb", True, cfg, trainer.stop_step, 0)
    accum = cfg.optim.grad_accum
    warmup = 2 // accum  # cudnn autotuning, lazy optimizer state
    trainer._run_steps(iter(batches[:2]), warmup, reporter)
    torch.cuda.synchronize()
    with sync_debug_mode("error"):
        trainer._run_steps(iter(batches[2:]), 6 // accum, reporter)
        assert len(trainer.step_log.pending) <= trainer.step_log.depth
    reporter.steps(trainer.step_log.drain())
    reporter.close(True)
    scalars = tb_scalars(tmp_path / "run")
    assert sorted(scalars["train/loss"]) == list(range(1, 8 // accum + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars["train/loss"].values())
    assert all(v > 0 for v in scalars["perf/step_time_ms"].values())
    assert all(v > 0 for v in scalars["perf/gpu_mem_gb"].values())


def _permitted(wait, mark):
    with sync_debug_mode(0):
        wait(mark)
