"""`capfast train --nproc N`: torchrun's agent run in this process, so that its outcome is capfast's.

torchrun ends with its own code (1 for any failed rank, and a traceback when it is signalled) and prints a
failure block of its own. Here the agent (torch.distributed.run.run, what torchrun runs) starts the ranks; a stop
signal goes to the ranks themselves, which stop after the same step and save; and the exit code of the first rank
to end becomes this process's (75 when the ranks stopped so), with one line for a rank killed by a signal (it
could not say why itself). The ranks print their own lines (once per node: capfast.common.distributed).
"""

import contextlib
import logging
import signal
import sys

import psutil

from capfast.common.signals import parse_signals

AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # what torchrun's agent handles, by stopping the ranks


def launch(nproc: int, argv: list[str], stop_signals: str) -> int:
    """Runs `capfast <argv>` as `nproc` DDP processes on this node; returns what this process should exit with."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    stops = parse_signals(stop_signals)
    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", *_agent_signals(stops), "-m", "capfast", *argv])
    _quiet(logging.getLogger("torch.distributed"))  # its warnings and failure lines; the ranks speak for themselves
    with _passed_to_ranks(stops):
        try:
            run(args)
            return 0
        except ChildFailedError as e:
            return outcome(e.failures)
        except SignalException as e:  # a signal the agent handles (SIGHUP, SIGQUIT): it stopped the ranks
            return 128 + int(e.sigval)


def _agent_signals(stops) -> list[str]:
    """torchrun's option that leaves the stop signals to this process. Before torch 2.9 the agent handles SIGTERM
    and SIGINT itself whatever it is told: it passes them on to the ranks, and this process exits 128 + signal."""
    from torch.distributed.launcher.api import LaunchConfig

    if "signals_to_handle" not in LaunchConfig.__dataclass_fields__:
        return []
    return ["--signals-to-handle=" + ",".join(name for name in AGENT_SIGNALS if signal.Signals[name] not in stops)]


def outcome(failures: dict) -> int:
    """The exit code for torchrun's failed ranks ({rank: ProcessFailure}): the first failure's (the agent then
    stops the other ranks), which is 75 when the ranks stopped on a signal and saved. A rank killed by a signal
    could not say why itself: this line does."""
    rank, first = min(failures.items(), key=lambda item: item[1].timestamp)  # ties: in the order torchrun saw them
    if first.exitcode >= 0:
        return first.exitcode
    print(f"capfast: error: rank {rank} (pid {first.pid}) was killed by {first.signal_name()}", file=sys.stderr,
          flush=True)
    return 128 - first.exitcode


@contextlib.contextmanager
def _passed_to_ranks(signals):
    """While the block runs, each of `signals` sent to this process goes on to the ranks (its children) as
    SIGTERM; they stop after the same step, save and exit 75. On leaving, the handlers the agent installed for
    its own signals are taken back too (launch may run inside another program: the tests)."""
    agent_signals = [signal.Signals[name] for name in AGENT_SIGNALS]
    previous = {sig: signal.getsignal(sig) for sig in {*signals, *agent_signals}}
    for sig in signals:
        signal.signal(sig, _terminate_children)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, handler)


def _terminate_children(signum, frame) -> None:
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGTERM)


def _quiet(logger: logging.Logger) -> None:
    logger.handlers = [logging.NullHandler()]  # in place of torch's stderr handler
    logger.propagate = False
