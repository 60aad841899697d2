"""Naming a stalled or lost rank. One stopped process, a hung GPU or a dead node holds every other rank in its
next collective, or fails it ("Connection closed by peer"), and the backend says neither whom it waited for nor
why.

Each rank runs a thread that posts "step, time" to torchrun's store (the attempt's keys: common/distributed.py)
every few seconds, and that ends the job (exit 4) when its own rank has completed no training step for
`dist_timeout_s`: it prints the ranks whose posts stopped (stopped or dead processes) or whose step is behind its
own. It is armed only while steps run, from the second step of an epoch on: an epoch's first batch (the loader's
compile), validation and checkpoints take as long as they take, and the process group's own timeout, a minute
longer, bounds those. When a collective fails instead, lost_peer() names the rank that ended: by the error it
posted as its last words, or as the one whose posts stopped (killed, or its node is down).
Either line is printed once per node (distributed.error_line).
"""

import contextlib
import os
import sys
import threading
import time

from capfast.common import distributed
from capfast.errors import CapfastError

EXIT_STALLED = 4  # a rank stalled or was lost


class PeerLost(CapfastError):
    """A collective failed because another rank ended: this rank's one line, which says who and why."""
    exit_code = EXIT_STALLED
    own = False  # it reports another rank's end


class StallWatch:
    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.step, self.last_step_at, self.armed, self.training = 0, time.monotonic(), False, False
        self.period = min(5.0, max(0.5, timeout_s / 10))
        self.store = distributed.attempt_store("steps", distributed.STORE_TIMEOUT)
        self.last_words = distributed.attempt_store(distributed.LAST_WORDS, distributed.STORE_TIMEOUT)
        self.store.set(f"node/{rank}", distributed.node())
        self._post()
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
        while not self._closed.wait(self.period):
            self._post()
            if self.armed and time.monotonic() - self.last_step_at > self.timeout_s:
                line = distributed.error_line(self.report(), own=False)
                if line:
                    print(f"capfast: error: {line}", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)

    def _post(self) -> None:
        try:
            self.store.set(str(self.rank), f"{self.step} {time.time()}")
        except Exception:  # a store that does not answer is reported by report()
            pass

    def report(self) -> str:
        now, quiet, behind = time.time(), [], []
        for rank in self._peers():
            try:
                post = self._read(rank)
            except Exception:  # reported as not heard from
                post = None
            if post is None or now - post[1] > self.timeout_s / 2:
                quiet.append(self._name(rank) + (f" (last heard at step {post[0]}, {now - post[1]:.0f} s ago)"
                                                 if post else " (never heard from)"))
            elif post[0] < self.step:
                behind.append(f"{self._name(rank)} (at step {post[0]})")
        parts = []
        if quiet:
            parts.append("not responding (stopped or dead): " + ", ".join(quiet))
        if behind:
            parts.append("behind: " + ", ".join(behind))
        culprits = "; ".join(parts) or "every rank answers at the same step: a collective hangs"
        return (f"rank {self.rank}: no training step completed for {self.timeout_s:.0f} s (dist_timeout_s) after "
                f"step {self.step}; {culprits}; ending the job")

    def lost_peer(self) -> PeerLost | None:
        """After a collective failed: who ended, once known, or None when every other rank still posts (the
        failure is this rank's own). A rank that posted its last words is named with them at once; a rank whose
        posts stop for two periods, as killed or cut off; a store that no longer answers, as its host's end."""
        self.close()  # this rank posts from here on: it is not lost
        try:
            return self._lost_peers()
        except Exception:  # a store op failed: torchrun's store is kept by the agent on node 0 (MASTER_ADDR)
            return PeerLost(f"lost torchrun's store at step {self.step}: its host {os.environ['MASTER_ADDR']} "
                            f"(torchrun's agent on node 0) is down or ended")

    def _lost_peers(self) -> PeerLost | None:
        before = {rank: self._read(rank) for rank in self._peers()}
        deadline = time.monotonic() + 2 * self.period + 1
        while True:
            self.store.set(str(self.rank), f"{self.step} {time.time()}")
            ended = [f"{self._name(rank)} ended: {words}" for rank in self._peers()
                     if (words := self._get(self.last_words, str(rank)))]
            if ended:
                return PeerLost("; ".join(ended))
            silent = [rank for rank in self._peers() if self._read(rank) == before[rank]]
            if not silent:
                return None
            if time.monotonic() > deadline:
                return PeerLost(f"lost {' and '.join(map(self._name, silent))} at step {self.step}: silent since "
                                f"(killed, or its node is down)")
            time.sleep(0.2)

    def _peers(self) -> list[int]:
        return [rank for rank in range(self.world_size) if rank != self.rank]

    def _name(self, rank: int) -> str:
        try:
            node = self._get(self.store, f"node/{rank}")
        except Exception:
            node = None
        return f"rank {rank} on {node or 'an unknown node'}"

    def _read(self, rank: int):
        post = self._get(self.store, str(rank))
        if post is None:
            return None
        step, when = post.split()
        return int(step), float(when)

    @staticmethod
    def _get(store, key: str) -> str | None:
        return store.get(key).decode() if store.check([key]) else None


def available() -> bool:
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
