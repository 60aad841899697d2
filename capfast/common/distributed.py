"""DDP plumbing: torchrun environment → process group, rank helpers, and the store the ranks of one attempt share.

torchrun restarts a failed group (--max-restarts) in the store of the attempt before, whose keys are still there,
and counts restarts per node (TORCHELASTIC_RESTART_COUNT is 1 where the failure was, 0 on the other nodes), so an
attempt cannot be named from the environment. Its ranks agree on a name instead (agree_on_attempt), under which
the process group, the stall watch and the ranks' last words (error_line) keep their keys.
"""

import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

LATEST_ATTEMPT = "capfast/latest_attempt"
POLL_S = 0.1
DEFAULT_TIMEOUT = timedelta(minutes=30)  # gloo's default: a store wait that nothing bounds otherwise
STORE_TIMEOUT = timedelta(seconds=5)  # for the side clients of attempt_store: a live store answers in ms
LAST_WORDS = "last_words"  # the space of attempt_store where each rank posts the error that ended it


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    attempt: str = ""  # the name every rank of this torchrun attempt shares; "" for a single process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_joined = DistInfo()  # the group this process joined last (kept after shutdown, for its last words)


def init(device_type: str, timeout_s: float | None = None) -> DistInfo:
    """Joins the process group torchrun described in the environment; a no-op for a single process. timeout_s
    bounds every collective (None: the backend's default, 10 min for NCCL, 30 for gloo)."""
    global _joined
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    if dist.is_initialized():
        return _joined
    from capfast.common.signals import die_with_parent

    die_with_parent(signal.SIGTERM)  # a rank whose launcher dies stops at a step and saves, not trains on alone
    timeout = timedelta(seconds=timeout_s) if timeout_s else DEFAULT_TIMEOUT
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    rank = int(os.environ["RANK"])
    _joined = DistInfo(rank, int(os.environ.get("LOCAL_RANK", "0")), world_size,
                       agree_on_attempt(store, rank, world_size, timeout))
    common = {"store": _in_attempt(store, "group"), "rank": rank, "world_size": world_size,
              **({"timeout": timeout} if timeout_s else {})}
    if device_type == "cuda":
        torch.cuda.set_device(_joined.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", _joined.local_rank), **common)
    else:
        dist.init_process_group("gloo", **common)
    return _joined


def agree_on_attempt(store, rank: int, world_size: int, timeout: timedelta) -> str:
    """A name that every rank of this attempt returns and no earlier attempt had. Rank 0 draws one and posts it;
    each other rank answers the name it reads with a token of its own, and takes the name once rank 0 has
    welcomed that token. A name left by an earlier attempt is never welcomed (its rank 0 is gone: torchrun stops
    every rank of a group before it starts the next), so a rank that read one reads again."""
    if rank == 0:
        return _lead_attempt(store, world_size)
    return _join_attempt(store, rank, timeout)


def _lead_attempt(store, world_size: int) -> str:
    name = uuid.uuid4().hex
    store.set(LATEST_ATTEMPT, name)
    joined = [_key(name, "join", str(r)) for r in range(1, world_size)]
    store.wait(joined)
    tokens = [token.decode() for token in store.multi_get(joined)]
    store.multi_set([_key(name, "welcome", token) for token in tokens], [b"1"] * len(tokens))
    return name


def _join_attempt(store, rank: int, timeout: timedelta) -> str:
    token, answered = uuid.uuid4().hex, None
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        name = store.get(LATEST_ATTEMPT).decode()  # waits for the first rank 0 to post one
        if name != answered:
            store.set(_key(name, "join", str(rank)), token)
            answered = name
        if store.check([_key(name, "welcome", token)]):
            return name
        time.sleep(POLL_S)  # polled: a store.wait that times out logs two lines
    raise dist.DistStoreError(f"rank {rank}: rank 0 of this attempt did not answer within {timeout}")


def _prefix(attempt: str, space: str) -> str:
    return f"capfast/{attempt}/{space}"


def _key(attempt: str, space: str, name: str) -> str:
    return f"{_prefix(attempt, space)}/{name}"  # as dist.PrefixStore(_prefix(...)) names `name`


def _in_attempt(store, space: str):
    """`store` with the keys of `space` in this process's attempt."""
    return dist.PrefixStore(_prefix(_joined.attempt, space), store)


def attempt_store(space: str, timeout: timedelta):
    """A client of its own of torchrun's store (MASTER_ADDR:MASTER_PORT) that gives up after `timeout`, with the
    keys of `space` in this process's attempt."""
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timeout)
    return _in_attempt(client, space)


def node() -> str:
    """This process's node as messages name it: torchrun's node rank and the host."""
    return f"node {_node_rank()} ({socket.gethostname()})"


def _node_rank() -> str:
    return os.environ.get("GROUP_RANK", "0")  # torchrun's; 0 without it


def error_line(message: str, own: bool = True) -> str | None:
    """The line this process prints for the error that ends it, or None when a rank of its node said it already:
    a refusal that every rank meets is printed once per node, and so is a report of another rank's end (own=False:
    a stalled or lost peer, which every survivor sees). A process's own error is also posted as its last words,
    which name the reason when the others report it lost (capfast/train/stall_watch.py)."""
    if not _joined.enabled:
        return message
    topic = uuid.uuid5(uuid.NAMESPACE_OID, message) if own else "a peer's end"
    try:
        words = attempt_store(LAST_WORDS, STORE_TIMEOUT)
        if own:
            words.set(str(_joined.rank), message)
        first = words.add(f"said/{_node_rank()}/{topic}", 1) == 1
    except Exception:  # the store's host is gone: say it here
        return message
    return message if first else None


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
