"""What a training run reports, on rank 0 only: every step's scalars in TensorBoard (read a step or two late
from the StepLog), a Custom Scalars layout and an HParams entry, and console progress on stdout."""

import collections

from capfast.common.progress import Progress, format_eta
from capfast.errors import CapfastError
from capfast.train import dashboard

WINDOW = 20  # recent steps behind the console's loss, img/s, data wait and ETA


def data_wait_pct(wait: float, step_time: float) -> float:
    # The wait is the host's, the step time the GPU's: while the host runs ahead the two overlap, hence the cap.
    return 100.0 * min(1.0, wait / step_time) if step_time > 0 else 0.0


def step_scalars(record: dict) -> dict:
    """TensorBoard scalars of one step record (see Trainer._push_step_stats)."""
    step_time, wait = record["step_time"], record["data_wait"]
    values = {"train/loss": record["loss"], "train/lr": record["lr"],
              "perf/images_per_sec": record["images"] / step_time, "perf/step_time_ms": step_time * 1e3,
              "perf/data_wait_ms": wait * 1e3, "perf/data_wait_pct": data_wait_pct(wait, step_time)}
    if "data_wait_slowest" in record:  # DDP: the straggler decides when the step's all-reduce completes
        slowest = record["data_wait_slowest"]
        values.update({"perf/data_wait_slowest_ms": slowest * 1e3,
                       "perf/data_wait_slowest_pct": data_wait_pct(slowest, step_time),
                       # each rank's latest measured step, a step or two old: the slowest rank's
                       "perf/step_time_slowest_ms": record["step_time_slowest"] * 1e3})
    if record.get("ready_batches") is not None:
        values["perf/ready_batches"] = record["ready_batches"]
    if record.get("gpu_mem_gb") is not None:
        values["perf/gpu_mem_gb"] = record["gpu_mem_gb"]
    values.update({name: value for name, value in record.items() if name.startswith("scst/")})
    return values


class Totals:
    """Sums over a run of step records: mean loss, img/s and data wait share."""

    def __init__(self, records=()):
        self.steps = self.loss = self.images = self.time = self.wait = 0.0
        for record in records:
            self.add(record)

    def add(self, record: dict) -> None:
        self.steps += 1
        self.loss += record["loss"]
        self.images += record["images"]
        self.time += record["step_time"]
        self.wait += record.get("data_wait_slowest", record["data_wait"])

    def summary(self) -> str:
        ips = self.images / self.time if self.time > 0 else 0.0
        return (f"loss {self.loss / max(1, self.steps):.4f}  {ips:,.1f} img/s  "
                f"data wait {data_wait_pct(self.wait, self.time):.1f}%")


class TrainConsole:
    """Progress of the training steps on stdout, and one summary line per epoch."""

    def __init__(self, enabled: bool, total_steps: int, initial_step: int, epochs: int, every_seconds: float):
        self.total_steps, self.epochs = total_steps, epochs
        self.progress = Progress(total_steps, initial_step, desc="train", unit="step",
                                 every_seconds=every_seconds, enabled=enabled)
        self.recent = collections.deque(maxlen=WINDOW)
        self.epoch = Totals()

    def step(self, record: dict) -> None:
        self.recent.append(record)
        self.epoch.add(record)
        recent = Totals(self.recent)
        eta = recent.time / recent.steps * (self.total_steps - record["step"])
        self.progress.update(record["step"], f"{recent.summary()}  ETA {format_eta(eta)}",
                             desc=f"train epoch {record['epoch'] + 1}/{self.epochs}")

    def epoch_done(self, epoch: int) -> None:
        if self.epoch.steps:
            self.progress.write(f"epoch {epoch + 1}/{self.epochs} train: {self.epoch.summary()}  "
                                f"({self.epoch.steps:.0f} steps, {format_eta(self.epoch.time)})")
        self.epoch = Totals()


class Reporter:
    def __init__(self, log_dir, enabled: bool, cfg, total_steps: int, initial_step: int):
        if cfg.progress_seconds < 0:
            raise CapfastError(f"progress_seconds must be >= 0 (0 = a line every step), got {cfg.progress_seconds}")
        self.enabled, self.log_every = enabled, cfg.log_every
        self.console = TrainConsole(enabled, total_steps, initial_step, cfg.epochs, cfg.progress_seconds)
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is heavy: import only on rank 0

        from capfast.train.config import to_dict

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if initial_step == 0:  # once per run: a resumed run's earlier event files hold them already
            dashboard.write_layout(self.writer, cfg.objective)
            dashboard.write_session_start(self.writer, to_dict(cfg))

    def steps(self, records: list[dict]) -> None:
        """Steps read back from the StepLog, oldest first."""
        if not self.enabled:
            return
        for record in records:
            if record["step"] % self.log_every == 0 or record["step"] == 1:
                self.scalars(record["step"], step_scalars(record))
            self.console.step(record)

    def epoch_done(self, epoch: int) -> None:
        if self.enabled:
            self.console.epoch_done(epoch)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def captions(self, step: int, images, captions: list[str]) -> None:
        """A few validation images with their generated captions, for eyeballing progress."""
        if not self.enabled:
            return
        for i, caption in enumerate(captions):
            if i < len(images):  # training from a feature cache shows captions only
                self.writer.add_image(f"val/image_{i}", images[i], step)
            self.writer.add_text(f"val/caption_{i}", caption, step)

    def write(self, message: str) -> None:
        self.console.progress.write(message)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, succeeded: bool) -> None:
        self.console.progress.close()
        if self.writer is not None:
            dashboard.write_session_end(self.writer, succeeded)
            self.writer.close()
