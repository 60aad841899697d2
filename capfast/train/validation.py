"""Validation during training: when it is due, running it, and what it leaves behind.

A validation follows the save of its step (the Trainer saves first), then only adds to the run directory's
validations.json and, for a new best CIDEr, points best.pt at that step's checkpoint: no checkpoint is written
twice. The best and eval.patience's count of validations since it are read from that log, so a resumed run
continues both; and a validation a kill cut short (its step saved, not logged) runs again on resume.
"""

import math

from capfast.common import distributed
from capfast.models.run_dir import RunDir, ValidationLog
from capfast.store import schema


class Validation:
    def __init__(self, cfg, data_dir, run_dir: RunDir, dist, make_loader):
        self.cfg, self.data_dir, self.run_dir, self.dist = cfg, data_dir, run_dir, dist
        self._make_loader = make_loader  # (split, train) -> loader: built at the first validation only
        self.loader = None
        self.log = ValidationLog()        # rank 0's
        self.validated_steps = set()      # every rank's
        self.last_cider = None            # the latest validation's CIDEr in this process's run (rank 0)

    def resume_at(self, step: int) -> None:
        """Rank 0 reads validations.json up to the resumed `step`; every rank learns which steps were validated."""
        if self.dist.is_main:
            self.log = self.run_dir.validations().until(step)
        steps = [e["step"] for e in self.log.entries] if self.dist.is_main else None
        self.validated_steps = set(distributed.broadcast_object(steps))

    def due(self, state) -> bool:
        """At the start of a run from init_from (so that best.pt and the end-of-run note compare with the model it
        started from) and at the end of every eval.every_epochs-th epoch, unless that step is validated already."""
        every = self.cfg.eval.every_epochs
        if not every or state.mid_epoch or state.step in self.validated_steps:
            return False
        return (state.step == 0 and bool(self.cfg.init_from)) or (state.epoch > 0 and state.epoch % every == 0)

    def out_of_patience(self) -> bool:
        """eval.patience validations in a row without a new best: stop (rank 0 counts, every rank follows)."""
        if not self.cfg.eval.patience:
            return False
        stale = distributed.broadcast_object(self.log.stale() if self.dist.is_main else None)
        return stale >= self.cfg.eval.patience

    def best_cider(self) -> float:
        best = self.log.best()
        return best["metrics"].get("CIDEr", -math.inf) if best else -math.inf

    def run(self, model, vocab, state, reporter, amp_dtype) -> None:
        """Scores `model` on the validation split (every rank generates its shard) and records the result."""
        from capfast.eval.evaluate import evaluate_model

        split = self.cfg.data.val_split
        if self.loader is None:  # built once: each new loader pays a numba compile
            self.loader = self._make_loader(split, train=False)
        report = evaluate_model(model, self.loader, vocab, schema.refs_path(self.data_dir, split),
                                generation=self.cfg.eval, max_images=self.cfg.eval.max_images, amp_dtype=amp_dtype,
                                meteor=False,  # METEOR's JVM costs ~10 s a call
                                attributes_file=schema.attributes_path(self.data_dir, split),
                                progress_seconds=self.cfg.progress_seconds)
        self.validated_steps.add(state.step)
        if self.dist.is_main:
            self._record(report, state, reporter)

    def _record(self, report, state, reporter) -> None:
        """Rank 0: TensorBoard and the console, best.pt when CIDEr is a new best, then validations.json."""
        metrics, log_images = report.metrics, self.cfg.eval.log_images
        reporter.scalars(state.step, {f"val/{k}": v for k, v in metrics.items()})
        reporter.captions(state.step, report.sample_images[:log_images], report.sample_captions[:log_images])
        reporter.write(f"epoch {state.epoch}/{self.cfg.epochs} val: "
                       + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        self.last_cider = metrics.get("CIDEr", -math.inf)
        self.log.add(state.step, state.epoch, metrics)
        if self.log.best() is self.log.entries[-1]:
            reporter.scalars(state.step, {f"best/{k}": v for k, v in metrics.items()})
            self.run_dir.mark_best(state.step)
        self.run_dir.write_validations(self.log)  # after best.pt: a kill in between validates again
