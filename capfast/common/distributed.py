"""DDP plumbing: torchrun environment → process group, rank helpers, and `--nproc` self-launch."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str, timeout_s: float | None = None) -> DistInfo:
    """Joins the process group torchrun described in the environment; a no-op for a single process. timeout_s
    bounds every collective (None: the backend's default, 10 min for NCCL, 30 for gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if dist.is_initialized():
        return info
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    store = attempt_store(timeout.get("timeout", timedelta(minutes=30)))
    common = {"store": store, "rank": info.rank, "world_size": world_size, **timeout}
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank), **common)
    else:
        dist.init_process_group("gloo", **common)
    return info


def attempt_store(timeout: timedelta):
    """torchrun's store, with the keys of this attempt apart: a group that torchrun restarts (--max-restarts)
    meets in the same store, and a peer that read the address an earlier attempt's rank left there would try to
    connect to a dead process until the timeout."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"capfast/attempt_{attempt()}/", store)


def attempt() -> int:
    """How many times torchrun restarted this group (0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def setup(device_name: str, timeout_s: float | None = None) -> tuple[torch.device, DistInfo]:
    """This process's device (auto, cpu, cuda; under torchrun its local GPU) and its place in the process group,
    which it joins."""
    from capfast.common.precision import resolve_device

    device = resolve_device(device_name)
    info = init(device.type, timeout_s)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return device, info


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's `obj` on rank `dst`, in rank order (None elsewhere); [obj] for a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def launch(nproc: int, argv: list[str], stop_signals: str) -> int:
    """Re-runs `capfast <argv>` under torchrun with `nproc` processes on this node; returns its exit code.
    `stop_signals` reach torchrun as SIGTERM, which it passes to every rank; torchrun dies with this process."""
    from capfast.common.signals import die_with_parent, forwarded_to

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "capfast", *argv]
    process = subprocess.Popen(cmd, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    with forwarded_to(process, stop_signals):
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: torchrun got the SIGINT too; keep waiting for it
                continue
