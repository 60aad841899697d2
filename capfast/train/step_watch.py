"""What the training loop learns from its step records, a step or two after each step (step_log.py): that a
rank was asked to stop, and that a step's loss or gradients were not finite.

Under DDP a record's flags are the same on every rank (they travel in the step's all-reduce, not in a
collective of their own), and a rank reads step k's record by the end of step k + depth at the latest (the
StepLog keeps at most `depth` steps pending). So acting after step k + depth is a step every rank computes
alike, without another sync; where the log was drained (a checkpoint, an epoch's end) every rank has read the
same records and acts at once.

A non-finite step changed nothing (the optimizer skips it on the device: Trainer._optimizer_step); more than
`nonfinite_skips` of them in a row end the run before any checkpoint is written after them.
"""

from capfast.errors import CapfastError


class NonFiniteLoss(CapfastError):
    exit_code = 3


class StepWatch:
    def __init__(self, depth: int, nonfinite_skips: int):
        self.depth, self.nonfinite_skips = depth, nonfinite_skips
        self.stop_seen_at: int | None = None  # the first step whose record carries a stop request
        self.failure: NonFiniteLoss | None = None
        self.failure_seen_at: int | None = None
        self._in_a_row, self._first_bad = 0, None

    def see(self, records: list[dict]) -> None:
        for record in records:
            if record.get("stop") and self.stop_seen_at is None:
                self.stop_seen_at = record["step"]
            self._count_nonfinite(record)

    def stopping(self, step: int, drained: bool = False) -> bool:
        return self.stop_seen_at is not None and (drained or step >= self.stop_seen_at + self.depth)

    def raise_if_failed(self, step: int, drained: bool = False) -> None:
        if self.failure is not None and (drained or step >= self.failure_seen_at + self.depth):
            raise self.failure

    def _count_nonfinite(self, record: dict) -> None:
        if not record.get("nonfinite"):
            self._in_a_row, self._first_bad = 0, None
            return
        self._in_a_row += 1
        self._first_bad = self._first_bad or record["step"]
        if self._in_a_row > self.nonfinite_skips and self.failure is None:
            skipped = f", after skipping {self.nonfinite_skips} such steps" if self.nonfinite_skips else ""
            self.failure_seen_at = record["step"]
            self.failure = NonFiniteLoss(
                f"the training loss or its gradients were not finite (NaN or inf) at step {self._first_bad}"
                f"{skipped}: stopped without writing a checkpoint (last.pt holds the last good one); lower "
                f"optim.lr or raise optim.warmup_steps, or let nonfinite_skips=N steps be skipped")
