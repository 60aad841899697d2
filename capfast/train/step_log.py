"""Per-step statistics read on the host a step or more late, so that the train step never waits for the GPU.

A step's device values (its loss, the slowest rank's data wait) are copied with non_blocking copies into
pinned host memory, and an event is recorded after them: it also ends the step's timing, started by an event
recorded before the step's data was fetched (CUDA events time what the GPU did, idle gaps included). A step
is handed out, values exact, once its event has completed: `ready()` only queries, it does not wait, except
that at most `depth` steps may be outstanding; beyond that it waits for the oldest. That wait is the loop's
one deliberate host<->device sync: it reads values `depth` steps old, which the GPU has long finished in the
steady state, and it keeps the CPU from running arbitrarily far ahead of the GPU.

On the CPU the same code runs with perf_counter marks; there every step is complete when it returns.
"""

import collections
import time
from dataclasses import dataclass

import torch


class HostMark:
    def __init__(self):
        self.time = time.perf_counter()

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def seconds_since(self, start: "HostMark") -> float:
        return self.time - start.time


class CudaMark:
    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()

    def seconds_since(self, start: "CudaMark") -> float:
        return start.event.elapsed_time(self.event) / 1e3


@dataclass
class _Pending:
    host: dict          # values known on the host when the step was pushed
    names: list         # of the device values, in the order of `copied`
    copied: torch.Tensor  # their host copy (pinned on CUDA), valid once `end` is done
    start: object
    end: object


class StepLog:
    def __init__(self, device: torch.device, depth: int = 2):
        self.device, self.depth = device, depth
        self.on_cuda = device.type == "cuda"
        self.pending = collections.deque()

    def mark(self):
        """A point on the device's timeline: take one before a step's data is fetched, pass it to push()."""
        return CudaMark(self.device) if self.on_cuda else HostMark()

    def push(self, start, host: dict, device_values: dict) -> None:
        """Queues one step's statistics: `host` as they are, `device_values` (0-d tensors) read once computed."""
        names = list(device_values)
        stacked = torch.stack([v.detach().float().reshape(()) for v in device_values.values()])
        copied = torch.empty(len(names), pin_memory=self.on_cuda)
        copied.copy_(stacked, non_blocking=self.on_cuda)
        self.pending.append(_Pending(host, names, copied, start, self.mark()))

    def ready(self) -> list[dict]:
        """The steps whose values are on the host, oldest first; waits only to keep at most `depth` pending."""
        records = []
        while self.pending and (len(self.pending) > self.depth or self.pending[0].end.done()):
            records.append(self._read(self.pending.popleft()))
        return records

    def drain(self) -> list[dict]:
        """Every pending step (waits for the GPU): at epoch ends, checkpoints and the end of training."""
        records = []
        while self.pending:
            records.append(self._read(self.pending.popleft()))
        return records

    def _read(self, entry: _Pending) -> dict:
        if not entry.end.done():
            self._wait(entry.end)
        values = dict(zip(entry.names, entry.copied.tolist()))
        return {**entry.host, **values, "step_time": entry.end.seconds_since(entry.start)}

    def _wait(self, mark) -> None:
        mark.wait()  # the one place the train loop blocks on the GPU
