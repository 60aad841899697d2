"""Runs that span nodes, emulated on one machine as torchrun's documentation does: two torchrun agents
(--nnodes=2 --nproc_per_node=1) meeting through a c10d rendezvous on 127.0.0.1, launched with
tools/slurm/train.sbatch's flags. A SIGTERM to one node's agent stops both nodes after one step; a killed rank on
either node costs one restart that lines up on both nodes and resumes; both end bit for bit where one uninterrupted
`capfast train --nproc 2` run ends. Then, in-process: the attempt's name, a rank's last words, a lost rank's
report, and resuming with another number of processes."""

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from filelock import FileLock
from test_faults import CONFIG, Run, train_run
from test_train import TINY

from capfast.models import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "tools" / "slurm" / "train.sbatch"
# 40 steps of 2 x 4 images, a checkpoint each; dropout, so that each rank's saved generators matter on resume
RECIPE = [*TINY, "model.encoder_depth=1", "model.dropout=0.1", "epochs=10", "checkpoint_every=1", "keep_last=40",
          "progress_seconds=0", "dist_timeout_s=20"]  # a lost rank is named within 2 posts of 2 s
STEPS = 40
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun sets it only for several processes per node
STOPPED = re.compile(r"capfast: stopped by .* at step (\d+)")


@pytest.fixture(scope="session")
def reference(converted, tmp_path_factory) -> Path:
    """An uninterrupted `capfast train --nproc 2` run of RECIPE, made once per test session (pytest-xdist's
    workers share it)."""
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "multinode_reference"
    with FileLock(f"{out}.lock"):
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            run = train_run(converted, out, *RECIPE, flags=["--nproc", "2"])
            assert run.wait(timeout=240) == 0, run.stderr[-3000:]
            (out / "done").touch()
    return out


def two_agents(data, out: Path, port: int, restarts: int) -> list[Run]:
    """Two nodes' torchrun agents, as tools/slurm/train.sbatch starts one on each node."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=capfast-test",
                f"--max-restarts={restarts}", "-m", "capfast")
    return [train_run(data, out, *RECIPE, flags=["--auto-resume"], launcher=torchrun, env=ONE_THREAD)
            for _ in range(2)]


def test_the_tests_launch_the_agents_as_the_sbatch_script_does():
    line = SBATCH.read_text()
    for flag in ("python -m torch.distributed.run", "--rdzv_backend=c10d", "--rdzv_endpoint=", "--rdzv_id=",
                 "--max-restarts=", "-m capfast train", "--auto-resume"):
        assert flag in line, flag


@pytest.mark.parametrize("signalled, killed", [(1, 0), (0, 1)])
def test_two_nodes_stop_together_and_restart_together_ending_like_one_uninterrupted_run(
        signalled, killed, reference, converted, tmp_path, free_port):
    """A SIGTERM to the agent of rank `signalled` stops both nodes after one step, saved: two agents train exactly
    like `--nproc 2`. The job started again (as a requeued one is, --max-restarts=1): the worker of rank `killed`
    is killed mid-run; both nodes restart once, resume, and end where the uninterrupted run ends, bit for bit."""
    out = tmp_path / "run"
    # No restarts here: the other agent would count its rank's stop (exit 75) as a failure and wait for this node
    with processes_ended(two_agents(converted, out, free_port, restarts=0)) as agents:
        wait_for_step(agents, 3)
        agent_of(agents, signalled).process.send_signal(signal.SIGTERM)
        codes = [agent.wait(timeout=120) for agent in agents]
    log = "\n".join(agent.stderr for agent in agents)
    assert codes == [1, 1], log[-3000:]  # torchrun's own code: signalled, or a rank that exited non-zero (75)
    step = int(STOPPED.search(log)[1])
    assert 3 <= step < STEPS and checkpoint.load(out / "last.pt")["train"]["step"] == step, log[-3000:]
    assert_same_weights(out / "last.pt", reference / "checkpoints" / f"step-{step:08d}.pt")

    with processes_ended(two_agents(converted, out, free_port, restarts=1)) as agents:
        wait_for_step(agents, step + 2)
        kill_while_the_other_waits(worker_of(agents, killed), worker_of(agents, 1 - killed))
        codes = [agent.wait(timeout=200) for agent in agents]
    assert codes == [0, 0], "\n".join(agent.stderr[-2000:] for agent in agents)
    assert_same_weights(out / "last.pt", reference / "last.pt")


def wait_for_step(agents: list[Run], step: int, timeout: float = 180) -> None:
    """Until either agent's output (its worker's, rank 0's progress) reaches `step`."""
    deadline = time.monotonic() + timeout
    while not any(re.search(rf"step {step}/", "\n".join(agent.lines)) for agent in agents):
        assert time.monotonic() < deadline, "\n".join(agent.stderr[-2000:] for agent in agents)
        assert all(agent.process.poll() is None for agent in agents), "\n".join(a.stderr[-2000:] for a in agents)
        time.sleep(0.05)


def kill_while_the_other_waits(victim: psutil.Process, survivor: psutil.Process) -> None:
    """Kills `victim` while `survivor` is stopped until its agent stops it for the restart, as a rank blocked in a
    collective on GPUs (NCCL) waits: the node whose worker failed counts a restart, the other restarts for the
    change in membership and counts none (TORCHELASTIC_RESTART_COUNT 1 and 0). Under gloo the survivor would fail at
    once, and the counts would agree or not by a race."""
    survivor.suspend()
    victim.kill()
    deadline = time.monotonic() + 120
    while not sigterm_pending(survivor.pid):
        assert time.monotonic() < deadline, "the survivor's agent did not stop it"
        time.sleep(0.05)
    survivor.resume()


def sigterm_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    pending = [int(re.search(rf"{field}:\s*([0-9a-f]+)", status)[1], 16) for field in ("SigPnd", "ShdPnd")]
    return any(mask & 1 << (signal.SIGTERM - 1) for mask in pending)


def worker_of(agents: list[Run], rank: int) -> psutil.Process:
    workers = [p for agent in agents for p in psutil.Process(agent.process.pid).children()]
    found = [p for p in workers if p.environ().get("RANK") == str(rank)]
    assert found, f"no worker of rank {rank}: the run ended before the kill?"
    return found[0]


def agent_of(agents: list[Run], rank: int) -> Run:
    pid = worker_of(agents, rank).ppid()
    return next(agent for agent in agents if agent.process.pid == pid)


class processes_ended:
    """`with processes_ended(runs) as runs:` kills what is left of their process trees on leaving (a hung run)."""

    def __init__(self, runs: list[Run]):
        self.runs = runs

    def __enter__(self) -> list[Run]:
        return self.runs

    def __exit__(self, *exc_info) -> None:
        for run in self.runs:
            try:
                tree = psutil.Process(run.process.pid)
                for process in [*tree.children(recursive=True), tree]:
                    process.kill()
            except psutil.NoSuchProcess:
                pass
        for run in self.runs:
            run.wait(timeout=30)


def assert_same_weights(path: Path, expected: Path) -> None:
    a, b = checkpoint.load(path), checkpoint.load(expected)
    assert a["train"]["step"] == b["train"]["step"]
    a, b = a["model"]["weights"], b["model"]["weights"]
    assert [k for k in b if not torch.equal(a[k], b[k])] == []


# ---- the store the ranks of an attempt share (in-process) ------------------------------------------------------

@pytest.fixture
def store(free_port, monkeypatch):
    """A TCPStore server in this process, at MASTER_ADDR:MASTER_PORT as torchrun's would be."""
    server = dist.TCPStore("127.0.0.1", free_port, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port))
    return server


def client(port: int):
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))


def test_ranks_agree_on_a_new_attempt_whatever_an_earlier_one_left(store, free_port):
    """Rank 1 starts first and reads the name an earlier attempt left; it still ends on rank 0's new one."""
    from capfast.common import distributed

    store.set(distributed.LATEST_ATTEMPT, "earlier")
    names = {}
    ranks = [threading.Thread(target=lambda r=r: names.setdefault(r, distributed.agree_on_attempt(
        client(free_port), r, 3, timedelta(seconds=10)))) for r in (1, 2)]
    for rank in ranks:
        rank.start()
    time.sleep(0.5)
    names[0] = distributed.agree_on_attempt(client(free_port), 0, 3, timedelta(seconds=10))
    for rank in ranks:
        rank.join(timeout=10)
    assert names[0] != "earlier" and names == {0: names[0], 1: names[0], 2: names[0]}


def joined(monkeypatch, rank: int, node: int = 0):
    from capfast.common import distributed

    monkeypatch.setattr(distributed, "_joined", distributed.DistInfo(rank, 0, 3, "attempt"))
    monkeypatch.setenv("GROUP_RANK", str(node))


def test_an_error_every_rank_meets_is_printed_once_per_node(store, monkeypatch):
    from capfast.common.distributed import error_line

    said = []
    for rank, node in ((0, 0), (1, 0), (2, 1)):
        joined(monkeypatch, rank, node)
        said.append(error_line("cannot resume: seed 0 -> 7"))
    assert said == ["cannot resume: seed 0 -> 7", None, "cannot resume: seed 0 -> 7"]
    joined(monkeypatch, 1)
    assert error_line("rank 1's own trouble") == "rank 1's own trouble"


def test_a_lost_rank_is_named_with_its_last_words_or_as_gone(store, monkeypatch):
    """Rank 0's collective failed. Rank 1 posted the error that ended it; rank 2 posts nothing more (killed): it is
    named once its posts have stopped for two periods. Once rank 2 posts again, nobody is lost."""
    from capfast.common.distributed import error_line
    from capfast.train.stall_watch import StallWatch

    watches = {}
    for rank in (2, 0):
        joined(monkeypatch, rank)
        watches[rank] = StallWatch(rank, 3, timeout_s=5)  # posts every 0.5 s
    watches[2].close()
    lost = watches[0].lost_peer()
    assert re.fullmatch(r"lost rank 1 on an unknown node and rank 2 on node 0 \(.+\) at step 0: silent since "
                        r"\(killed, or its node is down\)", str(lost)), lost
    joined(monkeypatch, 1)
    error_line("cannot write checkpoint: disk full")
    assert str(watches[0].lost_peer()) == "rank 1 on an unknown node ended: cannot write checkpoint: disk full"
    watches[0].close()


# ---- another number of processes ------------------------------------------------------------------------

def test_resuming_mid_epoch_with_another_number_of_processes_continues_the_same_batches(reference, converted,
                                                                                      tmp_path, capfast_cli):
    """Step 6 of the two-process run is mid-epoch 1 (4 steps an epoch): one process continues it, noted and
    recorded, on the global batches the two processes would have trained on, crops included."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "checkpoints" / "step-00000006.pt", out / "last.pt")
    result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, "--resume", *RECIPE,
                         "max_steps=7")
    assert result.code == 0, result.stderr
    assert "resuming at step 6 with changed settings: max_steps 0 -> 7, processes 2 -> 1" in result.stderr
    history = [{"step": 6, "changes": {"max_steps": [0, 7], "processes": [2, 1]}}]
    assert json.loads((out / "config.json").read_text())["history"] == history
    state = checkpoint.load(out / "last.pt")["train"]
    assert (state["step"], state["world_size"], state["config_history"]) == (7, 1, history)
    one, two = (first_batches(converted, world, epoch=1, skip=2) for world in (1, 2))
    assert torch.equal(one.image_ids, torch.cat([b.image_ids for b in two]))
    assert torch.equal(one.images, torch.cat([b.images for b in two]))


def first_batches(data: Path, world_size: int, epoch: int, skip: int):
    """The first batch each rank of `world_size` reads in `epoch` after `skip` batches, with RECIPE's loader."""
    from dataclasses import replace

    from capfast.common.normalization import IMAGENET
    from capfast.data import build_loader
    from capfast.data.loader import CaptionLoader
    from capfast.data.order import Shard
    from capfast.train.config import load_config

    cfg = load_config(CONFIG, RECIPE)
    single = build_loader(data / "train.beton", cfg.data, train=True, seed=cfg.seed, normalization=IMAGENET)
    batches = []
    for rank in range(world_size):
        loader = CaptionLoader(single.beton, replace(single.settings, batch_size=cfg.data.batch_size // world_size),
                               Shard(rank, world_size))
        with loader.epoch(epoch, skip_batches=skip) as epoch_batches:
            batches.append(next(epoch_batches))
    return batches[0] if world_size == 1 else batches


def test_another_number_of_processes_is_refused_mid_epoch_only_where_the_order_depends_on_it():
    from capfast.train.resume import processes_refusal
    from capfast.train.state import TrainState

    def refusal(order: str, batch_in_epoch: int):
        before = TrainState(world_size=2, batch_in_epoch=batch_in_epoch, config={"data": {"order": order}})
        return processes_refusal(before, TrainState(world_size=1))

    assert refusal("random", 2) is None and refusal("sequential", 2) is None and refusal("quasi_random", 0) is None
    assert "processes 2 -> 1 mid-epoch under data.order \"quasi_random\"" in refusal("quasi_random", 2)
