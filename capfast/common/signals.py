"""Stopping on a signal at a moment that loses nothing: a scheduler's preemption (SIGTERM), Ctrl-C (SIGINT), a
warning before a time limit (SIGUSR1).

StopRequest only notes the first such signal; the training loop looks at it between steps, and under DDP the
ranks agree on the step to stop at (capfast/train/trainer.py), which rank 0 saves before every rank exits with
EXIT_STOPPED. A second Ctrl-C stops at once. The launcher of `capfast train --nproc` passes what it receives on to
the ranks (capfast/common/launch.py), and a torchrun rank gets SIGTERM when its launcher or agent dies
(die_with_parent, capfast/common/distributed.py).
"""

import ctypes
import os
import signal
import sys
import threading

DEFAULT_STOP_SIGNALS = "SIGTERM,SIGINT,SIGUSR1"
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving; `--resume` (or --auto-resume) continues
PR_SET_PDEATHSIG = 1


def parse_signals(names: str) -> tuple[signal.Signals, ...]:
    """"SIGTERM,SIGUSR1" -> the signals; ValueError naming an unknown one."""
    parsed = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(name)
        parsed.append(signal.Signals[name])
    return tuple(parsed)


def signals_problem(names) -> str | None:
    """For a config option: None when `names` lists signals a process can catch."""
    try:
        parse_signals(names)
    except ValueError as e:
        return f"a comma-separated list of signals a process can catch (e.g. {DEFAULT_STOP_SIGNALS}); not {e}"
    return None


class StopRequest:
    """`with StopRequest("SIGTERM,SIGINT") as stop:` ... `stop.signal` is the name of the first of those signals
    received since, or None. Handlers are installed in the main thread only (Python runs them there)."""

    def __init__(self, names: str = DEFAULT_STOP_SIGNALS):
        self.signals = parse_signals(names)
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if _in_main_thread():
            for sig in self.signals:
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started in the background (nohup, `&`): Ctrl-C is not for this process
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: now
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            if os.environ.get("LOCAL_RANK", "0") == "0":  # once per node; rank 0 names the step after the stop
                print(f"capfast: {self.signal} received: stopping after the current step (saving last.pt)",
                      file=sys.stderr, flush=True)


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Linux: the kernel sends `sig` to this process when its parent dies, even by kill -9 (call it in the child,
    e.g. as a Popen preexec_fn)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()

