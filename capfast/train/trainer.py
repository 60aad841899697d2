"""The training loop: one small Trainer class, read top to bottom.

A step: the loader yields a batch already decoded, augmented and normalized on the device; the encoder runs
once per image and the decoder on all K captions; the loss is normalized by the global token count so that
N ranks × B/N images give the same gradient as 1 rank × B images.

Faults (README, "Faults and restarts"): a stop signal ends the run at a step every rank agrees on, after
saving (step_watch.py); a non-finite step is skipped on the device and, past `nonfinite_skips`, ends the run without
a checkpoint (step_watch.py); a rank without a step for `dist_timeout_s` ends the job naming the ranks behind
(stall_watch.py); checkpoints are verified, rotated and hold every rank's RNG and the data's fingerprint
(models/run_dir.py, train/state.py). Each step is saved at most once; a validation follows its step's save.
"""

import contextlib
import dataclasses
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
from capfast.data import build_feature_loader, build_loader
from capfast.errors import CapfastError
from capfast.models import build_captioner
from capfast.models.record import ModelRecord
from capfast.models.run_dir import RunDir
from capfast.store import schema
from capfast.store.beton import data_fingerprint
from capfast.store.checks import check_data_dir, check_same_vocabulary, require_split
from capfast.store.references import require_references
from capfast.store.vocab import Vocab
from capfast.train import resume, rng, scst, stall_watch
from capfast.train.config import TrainConfig, check_consistency, to_dict
from capfast.train.init_from import initial_model
from capfast.train.optim import build_optimizer, lr_factor, restore_optimizer, set_lr
from capfast.train.reporter import Reporter
from capfast.train.state import TrainState
from capfast.train.step_log import StepLog
from capfast.train.step_watch import StepWatch
from capfast.train.validation import Validation

STALL_MARGIN_S = 60  # the process group's timeout exceeds dist_timeout_s, so that StallWatch speaks first


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir: Path, out_dir: Path, resume: bool = False, stop=None):
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.stop = stop  # a capfast.common.signals.StopRequest, or None
        self.run_dir = RunDir(self.out_dir, cfg.keep_last)
        self._set_up_runtime(cfg)
        self.vocab = self._checked_data(cfg)
        saved, path = self.run_dir.load_latest(warn=self._note) if resume else (None, None)
        self.cfg, weights = self._model_config(cfg, saved, path)
        self._build_model(weights, pretrained=saved is None and weights is None)
        self._build_train_data()
        self.state = TrainState(world_size=self.dist.world_size, config=to_dict(self.cfg),
                                data=data_fingerprint(schema.beton_path(self.data_dir, self.cfg.data.train_split)))
        self._seed_ranks()
        self.validation, self.saved_step = Validation(self.cfg, self.data_dir, self.run_dir, self.dist,
                                                      self._make_loader), None
        self.config_changes = self._restore(saved, path) if resume else {}
        self._check_feature_cache()
        self._build_watches()

    # ---- set-up --------------------------------------------------------------------------------------

    def _set_up_runtime(self, cfg: TrainConfig) -> None:
        """The device, the process group and the autocast dtype."""
        self.device, self.dist = distributed.setup(cfg.device, timeout_s=cfg.dist_timeout_s + STALL_MARGIN_S)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _checked_data(self, cfg: TrainConfig) -> Vocab:
        """The data's vocabulary, once the training split and (when validation is asked for) the validation
        split and its references are there: refused up front, before any work."""
        vocab = check_data_dir(self.data_dir, cfg.data.train_split)
        if cfg.eval.every_epochs:
            split = cfg.data.val_split
            try:
                require_split(self.data_dir, split)
            except CapfastError as e:
                raise CapfastError(f"data.val_split: {e} (or set eval.every_epochs=0 to train without "
                                   f"validation)") from None
            require_references(self.data_dir, split, "validation (data.val_split)")
        return vocab

    def _model_config(self, cfg: TrainConfig, saved: dict | None, path) -> tuple[TrainConfig, dict | None]:
        """The run's config with the model it trains, and the weights it starts from (None: fresh or resumed).
        A run from init_from trains that checkpoint's architecture; resumed, its model comes from its checkpoint,
        and init_from is not read again."""
        weights = None
        if saved is not None:
            model = resume.model_config(saved, path, cfg.model)
        elif cfg.init_from:
            model, weights = initial_model(cfg.init_from, self.vocab, cfg.data.image_size)
        else:
            model = cfg.model
        cfg = dataclasses.replace(cfg, model=model)
        check_consistency(cfg)
        return cfg, weights

    def _build_model(self, weights: dict | None, pretrained: bool) -> None:
        """The model (identical initial weights on every rank), its objective, optimizer and gradient scaler."""
        torch.manual_seed(self.cfg.seed)
        self.model = build_captioner(self.cfg.model, vocab_size=len(self.vocab), image_size=self.cfg.data.image_size,
                                     load_encoder_weights=pretrained).to(self.device)
        if weights is not None:
            self.model.load_state_dict(weights)
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.set_reads_trunk_features(bool(self.cfg.data.features))
        self.scst = scst.build(self.cfg, self.data_dir, self.vocab, self.dist, self.amp_dtype)  # None for "xe"
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_train_data(self) -> None:
        """The training loader and the schedule's length in optimizer steps."""
        self.train_loader = self._make_loader(self.cfg.data.train_split, train=True)
        self.val_loader = None  # built at the first validation
        self.steps_per_epoch = len(self.train_loader) // self.cfg.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise CapfastError(f"the training split has fewer than data.batch_size × optim.grad_accum = "
                               f"{self.cfg.data.batch_size * self.cfg.optim.grad_accum} images")
        self.total_steps = self.steps_per_epoch * self.cfg.epochs  # the schedule's length, whatever max_steps says
        self.stop_step = min(self.total_steps, self.cfg.max_steps) if self.cfg.max_steps else self.total_steps

    def _seed_ranks(self) -> None:
        random.seed(self.cfg.seed + self.dist.rank)
        np.random.seed(self.cfg.seed + self.dist.rank)
        torch.manual_seed(self.cfg.seed + 1 + self.dist.rank)  # dropout differs per rank, as it should

    def _build_watches(self) -> None:
        """What watches the steps: the StepLog's records (stop requests, non-finite steps) and stalled ranks."""
        self.encoder_trainable = None
        self.batch_statistics = []  # BatchNorm buffers a step updates (set with the encoder's trainability)
        self.train_model = None
        self.step_log = StepLog(self.device)
        self.watch = StepWatch(self.step_log.depth if self.dist.enabled else 0, self.cfg.nonfinite_skips)
        self.stall = stall_watch.StallWatch(self.dist.rank, self.dist.world_size, self.cfg.dist_timeout_s) \
            if self.dist.enabled and stall_watch.available() else None
        self.last_step_time = 0.0
        self.stopped = False

    def _make_loader(self, split: str, train: bool):
        """The split's batches: images from its beton, or its features from the cache data.features names."""
        common = {"train": train, "device": self.device, "dtype": self.amp_dtype or torch.float32,
                  "seed": self.cfg.seed, "distributed": self.dist.enabled, "vocab_size": len(self.vocab)}
        if self.cfg.data.features:
            return build_feature_loader(self.data_dir, self.cfg.data.features, split, self.cfg.data, **common)
        return build_loader(schema.beton_path(self.data_dir, split), self.cfg.data,
                            normalization=self.model.normalization, **common)

    def _check_feature_cache(self) -> None:
        """A feature cache must come from this model's trunk (its weights as the run starts or resumes) and hold
        the validation split too: checked before the first step, not at the first validation."""
        if not self.cfg.data.features:
            return
        self.train_loader.cache.check_trunk(self.model.trunk_id(), "this run")
        if self.cfg.eval.every_epochs:
            self.validation.loader = self._make_loader(self.cfg.data.val_split, train=False)

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
        reporter = Reporter(self.out_dir / "tb", self.dist.is_main, self.cfg, self.stop_step, self.state.step)
        succeeded = False
        try:
            self._run(reporter)
            succeeded = True
        finally:
            reporter.close(succeeded)
            if self.stall is not None:
                self.stall.close()
        return {"step": self.state.step, "epoch": self.state.epoch, "last_cider": self.validation.last_cider,
                "best_cider": self.validation.best_cider(), "stopped": self.stopped}

    def _run(self, reporter: Reporter) -> None:
        """Epochs, each saved at its end and then validated when due, until the run is done or stopped."""
        while True:
            if self.validation.due(self.state):
                self._validate(reporter)
            if self._finished():
                return
            self._set_encoder_trainable(self.state.epoch)
            completed = self._train_epoch(reporter)
            self.stopped = self.watch.stopping(self.state.step, drained=True)
            self._save()
            if self.stopped:  # each rank exits 75 once last.pt is written: torchrun stops the rest at the first exit
                distributed.barrier()
            if self.stopped or not completed:
                return  # a stop request, or max_steps mid-epoch (last.pt records where to resume)

    def _done(self) -> bool:
        return self.state.step >= self.stop_step

    def _finished(self) -> bool:
        return self.state.epoch >= self.cfg.epochs or self._done() or self.validation.out_of_patience()

    def _train_epoch(self, reporter: Reporter) -> bool:
        """Trains the current epoch from where it stands: True when it ended, False when max_steps or a stop
        request came first."""
        epoch = self.state.epoch
        steps = self.steps_per_epoch - self.state.batch_in_epoch // self.cfg.optim.grad_accum
        batches = self.train_loader.epoch(epoch, skip_batches=self.state.batch_in_epoch)
        with contextlib.closing(batches), self._watched_for_stalls():
            self._run_steps(batches, steps, reporter)
        self._read_records(self.step_log.drain(), reporter, drained=True)
        reporter.epoch_done(epoch)
        return self.state.epoch > epoch

    def _watched_for_stalls(self):
        return self.stall.armed_while_training() if self.stall is not None else contextlib.nullcontext()

    def _run_steps(self, batches, steps: int, reporter: Reporter) -> None:
        """Up to `steps` optimizer steps on the iterator `batches`. Nothing here waits for the GPU but the
        StepLog's bounded lag (see step_log.py); the loss and timings reach `reporter` a step or two late."""
        accum = self.cfg.optim.grad_accum
        for _ in range(steps):
            start = self.step_log.mark()
            ready_batches = getattr(batches, "ready_batches", None)  # the loader's prepared batches, if it says
            fetch_begin = time.perf_counter()
            micro = list(itertools.islice(batches, accum))
            data_wait = time.perf_counter() - fetch_begin
            if len(micro) < accum:
                return
            stats = {**self._optimizer_step(micro), "epoch": self.state.epoch, "data_wait": data_wait,
                     "ready_batches": ready_batches}
            self.state.advance(accum, self.steps_per_epoch * accum)
            self._after_step(reporter, stats, start)
            if self._done() or self.watch.stopping(self.state.step):
                return

    def _optimizer_step(self, micro_batches: list) -> dict:
        """One optimizer step, queued on the device without waiting for it: the returned loss is a device tensor."""
        factor = lr_factor(self.state.step, self.total_steps, self.cfg.optim.warmup_steps,
                           self.cfg.optim.min_lr_ratio)
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
        images = sum(b.images.shape[0] for b in micro_batches) * self.dist.world_size
        return {"loss": loss.detach(), "nonfinite": nonfinite, "lr": self.optimizer.param_groups[0]["lr"],
                "images": images, **(self.scst.pop_stats() if self.scst else {})}

    def _accumulate_gradients(self, micro_batches: list) -> torch.Tensor:
        """Gradients of the step's mean loss on all ranks together -- cross-entropy per caption token, or SCST's
        per sampled caption: k micro-batches x N ranks give the gradient of one batch k*N times as large.
        Returns that mean loss."""
        if self.scst is not None:
            self.model.eval()  # SCST trains the test-time policy: see capfast/train/scst.py
            micro_batches = [self.scst.prepare(self.model, b, self.state.step, i) for i, b in enumerate(micro_batches)]
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

    def _after_step(self, reporter: Reporter, stats: dict, start) -> None:
        self._push_step_stats(stats, start)
        self._read_records(self.step_log.ready(), reporter)
        if self.stall is not None:
            self.stall.stepped(self.state.step)
        if self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0 or self._done():
            self._read_records(self.step_log.drain(), reporter, drained=True)  # every step up to the checkpoint
            reporter.flush()
            self._save()

    def _read_records(self, records: list[dict], reporter: Reporter, drained: bool = False) -> None:
        """Steps read back from the StepLog go to TensorBoard, then to the StepWatch, which may end the run."""
        reporter.steps(records)
        self.watch.see(records)
        if records:
            self.last_step_time = records[-1]["step_time"]
        self.watch.raise_if_failed(self.state.step, drained)

    def _push_step_stats(self, stats: dict, start) -> None:
        host = {"step": self.state.step, "epoch": stats["epoch"], "lr": stats["lr"], "images": stats["images"],
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

    def _validate(self, reporter: Reporter) -> None:
        self._save()  # a validation follows its step's checkpoint, which best.pt may then name
        self.validation.run(self.model, self.vocab, self.state, reporter, self.amp_dtype)
        self.model.train()
        self.model.set_encoder_trainable(bool(self.encoder_trainable))

    # ---- checkpoints ---------------------------------------------------------------------------------

    def checkpoint_parts(self) -> dict:
        """What a checkpoint holds, each part through its own state_dict (_restore reads them back)."""
        return {"model": ModelRecord.of(self.model, self.vocab).state_dict(), "train": self.state.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def _save(self) -> None:
        """This step's checkpoint, written once: rank 0 writes it, every rank gives its random generators."""
        if self.saved_step == self.state.step:
            return
        self.saved_step = self.state.step
        rngs = distributed.gather_object(rng.state())
        if self.dist.is_main:
            self.state.rng = rngs
            self.run_dir.save(self.checkpoint_parts(), self.state.step)

    def _restore(self, saved: dict, path) -> dict:
        """Continues from checkpoint `saved` (read from `path`) after the resume checks; returns the config
        changes it applies."""
        record = ModelRecord.from_state_dict(saved["model"], f"checkpoint {path}")
        check_same_vocabulary(f"checkpoint {path}", record.vocab, self.data_dir / schema.VOCAB_FILE,
                              self.vocab.fingerprint())
        before = TrainState.from_state_dict(saved["train"], path)
        changes = resume.check(path, before, self.state)
        self.model.load_state_dict(record.weights)
        restore_optimizer(self.optimizer, path, saved["optimizer"], self.cfg.optim)
        self.scaler.load_state_dict(saved["scaler"])
        history = before.config_history + ([{"step": before.step, "changes": resume.as_lists(changes)}]
                                           if changes else [])
        self.state = dataclasses.replace(before, world_size=self.state.world_size, config=self.state.config,
                                         config_history=history)
        if len(before.rng) == self.dist.world_size:  # else (another number of processes): the seeds of _seed_ranks
            rng.restore(before.rng[self.dist.rank])
        self.saved_step = before.step
        self.validation.resume_at(before.step)
        return changes

    def _note(self, message: str) -> None:
        if self.dist.is_main:
            print(f"capfast: warning: {message}", file=sys.stderr, flush=True)
