"""Console progress on stdout, rank 0 only: a live bar on a terminal, plain lines (at most one every
`every_seconds`) when stdout is a file or a pipe, so logs stay readable and in order with the other output."""

import datetime
import math
import sys
import time

DEFAULT_SECONDS = 30.0  # plain progress lines in logs: often enough to see a run move, rare enough to read


def is_main_process() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported: this process is in no process group
        return True
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


class Progress:
    """Position n of `total`, with a status text that the caller formats."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "",
                 every_seconds: float = DEFAULT_SECONDS, enabled: bool = True):
        self.total, self.desc, self.unit, self.every_seconds = total, desc, unit, every_seconds
        self.enabled = enabled
        self.bar = None
        self.last_line = -math.inf
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            # a one-item list keeps tqdm from prefixing the status with ", " (it does so to strings)
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stdout, dynamic_ncols=True,
                            bar_format="{desc}  {unit} {n_fmt}/{total_fmt} |{bar}| {postfix[0]}", postfix=[""],
                            leave=False)

    def update(self, n: int, status: str, desc: str | None = None) -> None:
        if not self.enabled:
            return
        self.desc = desc or self.desc
        if self.bar is not None:
            self.bar.set_description_str(self.desc, refresh=False)
            self.bar.postfix = [status]
            self.bar.update(n - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_seconds:
            self.last_line = now
            self.write(f"{self.desc}  {self.unit} {n}/{self.total}  {status}")

    def write(self, line: str) -> None:
        """A line of output that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)  # flushed: a log file must not lag minutes behind

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def track(items, total: int, desc: str, unit: str, every_seconds: float = DEFAULT_SECONDS, enabled: bool = True):
    """Yields `items`, showing rank 0's progress through them with their rate and an ETA: the progress rule of
    every long command (a bar on a terminal, a plain line at most every `every_seconds` otherwise)."""
    progress = Progress(total, desc=desc, unit=unit, every_seconds=every_seconds,
                        enabled=enabled and is_main_process())
    start = time.monotonic()
    try:
        for n, item in enumerate(items, start=1):
            yield item
            elapsed = time.monotonic() - start
            rate = f"  {n / elapsed:,.1f} {unit}/s" if elapsed > 0 else ""
            progress.update(n, f"ETA {format_eta(elapsed / n * (total - n))}{rate}")
    finally:
        progress.close()
