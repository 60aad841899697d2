"""Naming a stalled rank. One stopped process, a hung GPU or a dead node holds every other rank in its next
collective, and the backend's timeout ends that wait without saying whom it waited for.

Each rank runs a thread that posts "step, time" to torchrun's store every few seconds, and that ends the job
(exit 4) when its own rank has completed no training step for `dist_timeout_s`: it prints the ranks whose posts
stopped (stopped or dead processes) or whose step is behind its own. It is armed only while steps run, from
the second step of an epoch on: an epoch's first batch (the loader's compile), validation and checkpoints take
as long as they take, and the process group's own timeout, a minute longer, bounds those.
"""

import contextlib
import os
import sys
import threading
import time
from datetime import timedelta

EXIT_STALLED = 4
STORE_TIMEOUT_S = 10


class StallWatch:
    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.step, self.last_step_at, self.armed, self.training = 0, time.monotonic(), False, False
        self.store = _store()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capfast-stall-watch", daemon=True)
        self._thread.start()

    def stepped(self, step: int) -> None:
        self.step, self.last_step_at = step, time.monotonic()
        self.armed = self.training

    @contextlib.contextmanager
    def armed_while_training(self):
        """Arms the watch at the first step that completes inside the block, disarms it on leaving."""
        self.training = True
        try:
            yield
        finally:
            self.training = self.armed = False

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        period = min(5.0, max(0.5, self.timeout_s / 10))
        while not self._closed.wait(period):
            self._post()
            if self.armed and time.monotonic() - self.last_step_at > self.timeout_s:
                print(f"capfast: error: {self.report()}", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)

    def _post(self) -> None:
        try:
            self.store.set(str(self.rank), f"{self.step} {time.time()}")
        except Exception:  # a store that does not answer is reported by report()
            pass

    def report(self) -> str:
        now, quiet, behind = time.time(), [], []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            post = self._read(rank)
            if post is None or now - post[1] > self.timeout_s / 2:
                quiet.append(f"rank {rank}" + (f" (last heard at step {post[0]}, {now - post[1]:.0f} s ago)"
                                               if post else " (never heard from)"))
            elif post[0] < self.step:
                behind.append(f"rank {rank} (at step {post[0]})")
        parts = []
        if quiet:
            parts.append("not responding (stopped or dead): " + ", ".join(quiet))
        if behind:
            parts.append("behind: " + ", ".join(behind))
        culprits = "; ".join(parts) or "every rank answers at the same step: a collective hangs"
        return (f"rank {self.rank}: no training step completed for {self.timeout_s:.0f} s (dist_timeout_s) after "
                f"step {self.step}; {culprits}; ending the job")

    def _read(self, rank: int):
        try:
            if not self.store.check([str(rank)]):
                return None
            step, when = self.store.get(str(rank)).decode().split()
            return int(step), float(when)
        except Exception:
            return None


def _store():
    """A client of torchrun's store (the rendezvous store at MASTER_ADDR:MASTER_PORT), with a short timeout."""
    import torch.distributed as dist

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=STORE_TIMEOUT_S))
    from capfast.common.distributed import attempt

    return dist.PrefixStore(f"capfast/steps/attempt_{attempt()}/", client)


def available() -> bool:
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
