"""The training loop: one small Trainer class, read top to bottom.

A step: the loader yields a batch already decoded, augmented and normalized on the device; the encoder runs
once per image and the decoder on all K captions; the loss is normalized by the global token count so that
N ranks × B/N images give the same gradient as 1 rank × B images.

Faults (README, "Faults and restarts"): a stop signal ends the run at a step every rank agrees on, after
saving (watch.py); a non-finite step is skipped on the device and, past `nonfinite_skips`, ends the run without
a checkpoint (watch.py); a rank without a step for `dist_timeout_s` ends the job naming the ranks behind
(stall.py); checkpoints are verified, rotated and hold every rank's RNG and the data's fingerprint (run_dir.py).
"""

import contextlib
import itertools
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capfast.common import distributed
from capfast.common.precision import autocast_context, resolve_precision
from capfast.data import build_loader
from capfast.errors import CapfastError
from capfast.models import build_captioner
from capfast.store import schema
from capfast.store.beton import data_fingerprint
from capfast.store.checks import check_data_dir, check_same_vocabulary, require_split
from capfast.store.references import require_references
from capfast.store.vocab import Vocab
from capfast.train import resume, rng, scst, stall
from capfast.train.config import TrainConfig, check_consistency, to_dict
from capfast.train.init_from import initial_weights
from capfast.train.monitor import Monitor
from capfast.train.optim import build_optimizer, lr_factor, restore_optimizer, set_lr
from capfast.train.run_dir import RunDir
from capfast.train.step_log import StepLog
from capfast.train.watch import StepWatch

STALL_MARGIN_S = 60  # the process group's timeout exceeds dist_timeout_s, so that StallWatch speaks first


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir: Path, out_dir: Path, resume: bool = False, stop=None):
        self.cfg = cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.stop = stop  # a capfast.common.signals.StopRequest, or None
        self.device, self.dist = distributed.setup(cfg.device, timeout_s=cfg.dist_timeout_s + STALL_MARGIN_S)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.vocab = check_data_dir(self.data_dir, cfg.data.train_split)
        self._check_validation_data()
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_cider = -math.inf
        self.last_cider = None     # the latest validation's CIDEr in this process's run
        self.stale_evals = 0       # validations in a row without a new best CIDEr (eval.patience)
        self.config_changes = {}   # on resume: {key: (checkpoint's value, this run's value)}, all applied
        self.config_history = []   # every resume's changes: [{"step", "changes"}], kept in the checkpoints

        weights = initial_weights(cfg, self.vocab)  # init_from: also adopts that checkpoint's cfg.model
        check_consistency(cfg)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_captioner(cfg.model, vocab_size=len(self.vocab), image_size=cfg.data.image_size,
                                     load_encoder_weights=not resume and weights is None).to(self.device)
        if weights is not None:
            self.model.load_state_dict(weights)
        self.scst = scst.build(cfg, self.data_dir, self.vocab, self.dist, self.amp_dtype)  # None for "xe"
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.train_loader = self._make_loader(cfg.data.train_split, train=True)
        self.steps_per_epoch = len(self.train_loader) // cfg.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise CapfastError(f"the training split has fewer than data.batch_size × optim.grad_accum = "
                               f"{cfg.data.batch_size * cfg.optim.grad_accum} images")
        self.total_steps = self.steps_per_epoch * cfg.epochs  # the schedule's length, whatever max_steps says
        self.stop_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps

        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        torch.manual_seed(cfg.seed + 1 + self.dist.rank)  # dropout differs per rank, as it should
        self.run_dir = RunDir(self.out_dir, cfg.keep_last)
        self.data = data_fingerprint(schema.beton_path(self.data_dir, cfg.data.train_split))
        self.saved_rngs = None
        if resume:
            self._restore()
        self.encoder_trainable = None
        self.batch_statistics = []  # BatchNorm buffers a step updates (set with the encoder's trainability)
        self.train_model = None
        self.val_loader = None
        self.step_log = StepLog(self.device)
        self.watch = StepWatch(self.step_log.depth if self.dist.enabled else 0, cfg.nonfinite_skips)
        self.stall = stall.StallWatch(self.dist.rank, self.dist.world_size, cfg.dist_timeout_s) \
            if self.dist.enabled and stall.available() else None
        self.last_step_time = 0.0
        self.stopped = False

    # ---- setup helpers -------------------------------------------------------------------------------

    def _check_validation_data(self) -> None:
        """Validation asked for (eval.every_epochs > 0) needs its split and references: refused up front."""
        split = self.cfg.data.val_split
        if not self.cfg.eval.every_epochs:
            return
        try:
            require_split(self.data_dir, split)
        except CapfastError as e:
            raise CapfastError(f"data.val_split: {e} (or set eval.every_epochs=0 to train without validation)") \
                from None
        require_references(self.data_dir, split, "validation (data.val_split)")

    def _make_loader(self, split: str, train: bool):
        beton = schema.beton_path(self.data_dir, split)
        return build_loader(
            beton, self.cfg.data, train=train, device=self.device, dtype=self.amp_dtype or torch.float32,
            seed=self.cfg.seed, distributed=self.dist.enabled, normalization=self.model.normalization,
            vocab_size=len(self.vocab))

    def _set_encoder_trainable(self, epoch: int) -> None:
        """Freezes or unfreezes the encoder for this epoch; (re)wraps DDP/compile when that changes."""
        start = self.cfg.encoder_trainable_from_epoch
        trainable = start >= 0 and epoch >= start
        self.model.train()
        self.model.set_encoder_trainable(trainable)
        if trainable == self.encoder_trainable:
            return
        self.encoder_trainable = trainable
        self.batch_statistics = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                                 and m.training and m.track_running_stats for b in m.buffers(recurse=False)]
        model = self.model
        if self.dist.enabled:
            # DDP registers only parameters that require grad, so a change of trainability needs a new wrapper.
            device_ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self.train_model = torch.compile(model) if self.cfg.compile else model

    # ---- the loop ------------------------------------------------------------------------------------

    def train(self) -> dict:
        monitor = Monitor(self.out_dir / "tb", self.dist.is_main, self.cfg, self.stop_step, self.step)
        succeeded = False
        try:
            if self._validates_start():
                self._validate(monitor)  # best.pt starts as the init_from model: a run never ends below its start
            while self.epoch < self.cfg.epochs and not self._done() and not self._out_of_patience():
                self._set_encoder_trainable(self.epoch)
                self._train_epoch(monitor)
                finished = self.batch_in_epoch >= self.steps_per_epoch * self.cfg.optim.grad_accum
                if finished:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.stopped = self.watch.stopping(self.step, drained=True)
                if finished or self.stopped:
                    self._save()  # the epoch's checkpoint comes before its validation
                if self.stopped or not finished:
                    break  # a stop request, or max_steps mid-epoch (last.pt records where to resume)
                self._validate_if_due(monitor)
            succeeded = True
        finally:
            monitor.close(succeeded)
            if self.stall is not None:
                self.stall.close()
        return {"step": self.step, "epoch": self.epoch, "best_cider": self.best_cider, "last_cider": self.last_cider,
                "stopped": self.stopped}

    def _done(self) -> bool:
        return self.step >= self.stop_step

    def _train_epoch(self, monitor: Monitor) -> None:
        accum = self.cfg.optim.grad_accum
        steps = self.steps_per_epoch - self.batch_in_epoch // accum  # batch_in_epoch counts whole steps
        epoch = self.train_loader.epoch(self.epoch, skip_batches=self.batch_in_epoch)
        with contextlib.closing(epoch), self._watched_for_stalls():
            self._run_steps(epoch, steps, monitor)
        self._read_records(self.step_log.drain(), monitor, drained=True)
        monitor.epoch_done(self.epoch)

    def _watched_for_stalls(self):
        return self.stall.armed_while_training() if self.stall is not None else contextlib.nullcontext()

    def _run_steps(self, batches, steps: int, monitor: Monitor) -> None:
        """Up to `steps` optimizer steps on the iterator `batches`. Nothing here waits for the GPU but the
        StepLog's bounded lag (see step_log.py); the loss and timings reach `monitor` a step or two late."""
        accum = self.cfg.optim.grad_accum
        for _ in range(steps):
            start = self.step_log.mark()
            ready_batches = getattr(batches, "ready_batches", None)  # the loader's prepared batches, if it says
            fetch_begin = time.perf_counter()
            micro = list(itertools.islice(batches, accum))
            data_wait = time.perf_counter() - fetch_begin
            if len(micro) < accum:
                return
            stats = self._optimizer_step(micro)
            self.batch_in_epoch += accum
            self._after_step(monitor, {**stats, "data_wait": data_wait, "ready_batches": ready_batches}, start)
            if self._done() or self.watch.stopping(self.step):
                return

    def _optimizer_step(self, micro_batches: list) -> dict:
        """One optimizer step, queued on the device without waiting for it: the returned loss is a device tensor."""
        factor = lr_factor(self.step, self.total_steps, self.cfg.optim.warmup_steps, self.cfg.optim.min_lr_ratio)
        set_lr(self.optimizer, factor)
        statistics = [b.clone() for b in self.batch_statistics]  # a skipped step leaves BatchNorm's as they were
        loss = self._accumulate_gradients(micro_batches)
        grad_norm = None
        if self.cfg.optim.grad_clip > 0 or not self.scaler.is_enabled():  # fp16's GradScaler finds infs itself
            self.scaler.unscale_(self.optimizer)  # no-ops unless fp16 (whose GradScaler.step reads found_inf)
            # an infinite max_norm measures without clipping: a non-finite gradient skips the step as a loss does
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
        nonfinite = ~torch.isfinite(loss) if grad_norm is None else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if not self.scaler.is_enabled():  # fp16: GradScaler skips steps with non-finite gradients itself
            self.optimizer.found_inf = nonfinite.float()  # the fused AdamW then leaves weights and state as they are
        for buffer, before in zip(self.batch_statistics, statistics):
            buffer.copy_(torch.where(nonfinite, before, buffer))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        images = sum(b.images.shape[0] for b in micro_batches) * self.dist.world_size
        return {"loss": loss.detach(), "nonfinite": nonfinite, "lr": self.optimizer.param_groups[0]["lr"],
                "images": images, **(self.scst.pop_stats() if self.scst else {})}

    def _accumulate_gradients(self, micro_batches: list) -> torch.Tensor:
        """Gradients of the step's mean loss on all ranks together -- cross-entropy per caption token, or SCST's
        per sampled caption: k micro-batches x N ranks give the gradient of one batch k*N times as large.
        Returns that mean loss."""
        if self.scst is not None:
            self.model.eval()  # SCST trains the test-time policy: see capfast/train/scst.py
            micro_batches = [self.scst.prepare(self.model, b, self.step, i) for i, b in enumerate(micro_batches)]
        units = sum(self._loss_units(b) for b in micro_batches)
        global_units = distributed.all_reduce_sum(units.float()).clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            with self._maybe_no_sync(i == len(micro_batches) - 1):
                loss_sum += self._forward_backward(batch, global_units)
        return distributed.all_reduce_sum(loss_sum) / global_units

    def _loss_units(self, batch) -> torch.Tensor:
        """What the loss is a mean of: caption tokens (cross-entropy) or sampled captions (SCST)."""
        if self.scst is not None:
            return torch.tensor(batch.captions.shape[0] * batch.captions.shape[1], device=self.device)
        return (batch.captions[..., 1:] != self.vocab.pad_id).sum()

    def _forward_backward(self, batch, global_units: torch.Tensor) -> torch.Tensor:
        """Backward of this micro-batch's share of the step's loss; returns its summed loss."""
        with autocast_context(self.device, self.amp_dtype):
            logits = self.train_model(batch.images, batch.captions)
        if self.scst is not None:
            loss_sum = self.scst.loss_sum(logits, batch)  # scores the samples on the host meanwhile
        else:
            loss_sum = F.cross_entropy(logits.float().flatten(0, -2), batch.captions[..., 1:].flatten(),
                                       ignore_index=self.vocab.pad_id, reduction="sum",
                                       label_smoothing=self.cfg.optim.label_smoothing)
        # DDP averages gradients over ranks, hence x world_size: the sum over ranks / the global count.
        self.scaler.scale(loss_sum * self.dist.world_size / global_units).backward()
        return loss_sum.detach()

    def _maybe_no_sync(self, sync: bool):
        model = self.train_model
        model = getattr(model, "_orig_mod", model)
        if sync or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def _after_step(self, monitor: Monitor, stats: dict, start) -> None:
        self._push_step_stats(stats, start)
        self._read_records(self.step_log.ready(), monitor)
        if self.stall is not None:
            self.stall.stepped(self.step)
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 or self._done():
            self._read_records(self.step_log.drain(), monitor, drained=True)  # every step up to the checkpoint
            monitor.flush()
            self._save()

    def _read_records(self, records: list[dict], monitor: Monitor, drained: bool = False) -> None:
        """Steps read back from the StepLog go to TensorBoard, then to the StepWatch, which may end the run."""
        monitor.steps(records)
        self.watch.see(records)
        if records:
            self.last_step_time = records[-1]["step_time"]
        self.watch.raise_if_failed(self.step, drained)

    def _push_step_stats(self, stats: dict, start) -> None:
        host = {"step": self.step, "epoch": self.epoch, "lr": stats["lr"], "images": stats["images"],
                "data_wait": stats["data_wait"], "ready_batches": stats["ready_batches"]}
        if self.device.type == "cuda":
            host["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30  # allocator's host counter
        on_device = {"loss": stats["loss"], "nonfinite": stats["nonfinite"]}
        for name, value in stats.items():  # the objective's own scalars (scst/...): host numbers or device tensors
            if name.startswith("scst/"):
                (on_device if torch.is_tensor(value) else host)[name] = value
        stop = float(self.stop is not None and self.stop.signal is not None)
        if self.dist.enabled:  # the step's one MAX all-reduce: the slowest rank's wait and step, any rank's stop
            slowest = distributed.all_reduce_max(torch.stack([self._scalar(v) for v in (
                stats["data_wait"], self.last_step_time, stop)]))
            on_device.update(data_wait_slowest=slowest[0], step_time_slowest=slowest[1], stop=slowest[2])
        else:
            host["stop"] = stop
        self.step_log.push(start, host, on_device)

    def _scalar(self, value: float) -> torch.Tensor:
        # torch.full passes the value as a kernel argument: no host-to-device copy to wait on
        return torch.full((), value, dtype=torch.float32, device=self.device)

    # ---- validation ----------------------------------------------------------------------------------

    def _validates_start(self) -> bool:
        """A run from init_from is scored before its first step, so that best.pt and the end-of-run note can
        compare with the model it started from."""
        return bool(self.cfg.init_from and self.cfg.eval.every_epochs and self.step == 0)

    def _out_of_patience(self) -> bool:
        """eval.patience validations in a row without a new best: stop (rank 0 counts, every rank follows)."""
        if not self.cfg.eval.patience:
            return False
        self.stale_evals = distributed.broadcast_object(self.stale_evals)
        return self.stale_evals >= self.cfg.eval.patience

    def _validate_if_due(self, monitor: Monitor) -> None:
        every = self.cfg.eval.every_epochs
        if every and self.epoch % every == 0:
            self._validate(monitor)

    def _validate(self, monitor: Monitor) -> None:
        from capfast.eval.evaluate import evaluate_model

        if self.step == 0:  # the start's validation: its best.pt comes before any other checkpoint
            self.saved_rngs = distributed.gather_object(rng.state())

        if self.val_loader is None:  # built once: each new loader pays a numba compile
            self.val_loader = self._make_loader(self.cfg.data.val_split, train=False)
        refs = schema.refs_path(self.data_dir, self.cfg.data.val_split)
        report = evaluate_model(self.model, self.val_loader, self.vocab, refs, generation=self.cfg.eval,
                                max_images=self.cfg.eval.max_images,
                                amp_dtype=self.amp_dtype, meteor=False,  # METEOR's JVM costs ~10 s a call
                                attributes_file=schema.attributes_path(self.data_dir, self.cfg.data.val_split),
                                progress_seconds=self.cfg.progress_seconds)
        self.model.train()
        self.model.set_encoder_trainable(bool(self.encoder_trainable))
        if not self.dist.is_main:
            return
        monitor.scalars(self.step, {f"val/{k}": v for k, v in report.metrics.items()})
        monitor.captions(self.step, report.sample_images[:self.cfg.eval.log_images],
                         report.sample_captions[:self.cfg.eval.log_images])
        monitor.write(f"epoch {self.epoch}/{self.cfg.epochs} val: "
                      + "  ".join(f"{k} {v:.3f}" for k, v in report.metrics.items()))
        cider = self.last_cider = report.metrics.get("CIDEr", -math.inf)
        self.stale_evals += 1
        if cider > self.best_cider:
            self.best_cider, self.stale_evals = cider, 0
            monitor.scalars(self.step, {f"best/{k}": v for k, v in report.metrics.items()})
            self._save(best=True, metrics=report.metrics)
        elif self.cfg.eval.patience:
            self._save(validated=True)  # last.pt then carries the count of stale validations to --resume

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _save(self, best: bool = False, metrics: dict | None = None, validated: bool = False) -> None:
        """A checkpoint of this step (rank 0 writes it; every rank gives its RNG state, except for best.pt and
        `validated` re-saves, which rank 0 alone writes after validation: nothing drew random numbers since the
        epoch's save)."""
        rngs = self.saved_rngs if best or validated else distributed.gather_object(rng.state())
        if not self.dist.is_main:
            return
        self.saved_rngs = rngs
        self.run_dir.save({
            "model_config": to_dict(self.cfg)["model"],
            "model": self.model.state_dict(),
            "vocab": list(self.vocab.words),
            "image_size": self.cfg.data.image_size,
            "normalization": self.model.normalization.to_dict(),
            "train_config": to_dict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_cider": self.best_cider, "stale_evals": self.stale_evals, "metrics": metrics or {},
            "world_size": self.dist.world_size,
            "rng": rngs,
            "data": self.data,
            "config_history": self.config_history,
        }, best=best)

    def _restore(self) -> None:
        state, path = self.run_dir.load_latest(warn=self._note)
        check_same_vocabulary(f"checkpoint {path}", Vocab(tuple(state["vocab"])), self.data_dir / schema.VOCAB_FILE,
                              self.vocab.fingerprint())
        resume.check_same_data(path, state["data"], self.data)
        changes = resume.config_changes(state["train_config"], to_dict(self.cfg))
        resume.check_resumable(path, changes, state["world_size"], self.dist.world_size,
                               mid_epoch=state["batch_in_epoch"] > 0)
        self.model.load_state_dict(state["model"])
        restore_optimizer(self.optimizer, path, state["optimizer"], self.cfg.optim)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_cider = state["best_cider"]
        self.stale_evals = state["stale_evals"]
        self.config_changes = changes
        self.config_history = state["config_history"]
        if changes:
            self.config_history.append({"step": self.step, "changes": {k: list(v) for k, v in changes.items()}})
        if len(state["rng"]) == self.dist.world_size:  # else (a new world size, at an epoch's start): fresh seeds
            rng.restore(state["rng"][self.dist.rank])

    def _note(self, message: str) -> None:
        if self.dist.is_main:
            print(f"capfast: warning: {message}", file=sys.stderr, flush=True)
