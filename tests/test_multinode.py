"""Runs that span nodes, emulated on one machine as torchrun's documentation does: two torchrun agents
(--nnodes=2 --nproc_per_node=1) meeting through a c10d rendezvous on 127.0.0.1, launched with
tools/slurm/train.sbatch's flags. Two agents train bit for bit like one `capfast train --nproc 2`; a SIGTERM to
either node's agent stops both nodes after one step; a rank killed on either node costs one restart, which lines
up on both nodes and resumes exactly. Then, in-process: the attempt's name, a rank's last words, a lost rank's
report, and resuming with another number of processes."""

import contextlib
import json
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
from conftest import shared_dir
from test_faults import CONFIG, Run, train_run
from test_train import TINY

from capfast.models import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "tools" / "slurm" / "train.sbatch"
# 24 steps of 2 x 4 images on ResNet-18's first stage, a checkpoint each (every step compared with the reference);
# dropout, so that each rank's saved generators matter on resume
RECIPE = [*TINY, "model.encoder_depth=1", "model.dropout=0.1", "epochs=6", "checkpoint_every=1", "keep_last=24",
          "progress_seconds=0", "dist_timeout_s=8"]  # a lost rank is named after 2 silent posts of 0.8 s
STEPS = 24
STOPPED = re.compile(r"capfast: stopped by .* at step (\d+)")
STEP = re.compile(r"step (\d+)/")
CAPFAST_TRACEBACK = re.compile(r'File ".*/capfast/')  # a frame of capfast's in a traceback (torchrun's have none)


@pytest.fixture(scope="session")
def reference(converted, tmp_path_factory) -> Path:
    """An uninterrupted `capfast train --nproc 2` run of RECIPE, made once per test session (pytest-xdist's
    workers share it)."""
    def build(root: Path):
        run = train_run(converted, root / "run", *RECIPE, flags=["--nproc", "2"])
        assert run.wait(timeout=240) == 0, run.stderr[-3000:]

    return shared_dir(tmp_path_factory, "multinode_reference", build) / "run"


def two_agents(data, out: Path, port: int, restarts: int) -> list[Run]:
    """Two nodes' torchrun agents, as tools/slurm/train.sbatch starts one on each node."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=capfast-test",
                f"--max-restarts={restarts}", "-m", "capfast")
    return [train_run(data, out, *RECIPE, flags=["--auto-resume"], launcher=torchrun) for _ in range(2)]


def test_the_tests_launch_the_agents_as_the_sbatch_script_does():
    line = SBATCH.read_text()
    for flag in ("python -m torch.distributed.run", "--rdzv_backend=c10d", "--rdzv_endpoint=", "--rdzv_id=",
                 "--max-restarts=", "-m capfast train", "--auto-resume"):
        assert flag in line, flag


@pytest.mark.parametrize("signalled", [0, 1])
def test_a_sigterm_to_either_nodes_agent_stops_both_after_one_step_as_nproc_2_trains(signalled, reference,
                                                                                      converted, tmp_path, free_port):
    """A SIGTERM to the agent of rank `signalled`'s node: both ranks stop after the same step, rank 0 saves and
    says so in one line; no error, no capfast traceback; both nodes end. What the two nodes saved is, step by step,
    what `capfast train --nproc 2` saved. (torchrun's own exit code is its own: 1, or now and then SIGABRT when the
    agent that hosts the rendezvous ended first.)"""
    out = tmp_path / "run"
    # No restarts here: the other agent would count its rank's stop (exit 75) as a failure and wait for this node
    with processes_ended(two_agents(converted, out, free_port, restarts=0)) as agents:
        wait_for_step(agents, 1)
        agent_of(agents, signalled).process.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=120)
    log = "\n".join(agent.stderr for agent in agents)
    stops = STOPPED.findall(log)
    assert len(stops) == 1 and log.count("SIGTERM received") == 1, log[-3000:]
    assert "capfast: error" not in log and not CAPFAST_TRACEBACK.search(log), log[-3000:]
    step = int(stops[0])
    assert checkpoint.load(out / "last.pt")["train"]["step"] == step < STEPS
    assert_same_checkpoints(out, reference, range(1, step + 1))


def test_a_rank_killed_on_either_node_costs_one_restart_that_resumes_exactly(reference, converted, tmp_path,
                                                                             free_port):
    """The worker of rank 0 is killed, then, in the restarted group, the worker of rank 1. Each time both nodes
    restart once (--max-restarts=1 counts the failures of a node's own ranks: one each), the survivor's node names
    the lost rank in one line, the new group resumes from last.pt, and the run ends saving, bit for bit, every
    step that the uninterrupted run saved."""
    out = tmp_path / "run"
    with processes_ended(two_agents(converted, out, free_port, restarts=1)) as agents:
        for victim in (0, 1):
            wait_for_step(agents, last_step_seen(agents) + 2)
            kill_while_the_other_waits(worker_of(agents, victim), worker_of(agents, 1 - victim))
        codes = [agent.wait(timeout=200) for agent in agents]
    log = "\n".join(agent.stderr for agent in agents)
    assert codes == [0, 0], log[-3000:]
    for victim in (0, 1):
        lost = re.findall(rf"capfast: error: lost rank {victim} on node {victim} \(.+\) at step \d+: silent since "
                          r"\(killed, or its node is down\)", log)
        assert len(lost) == 1, log[-3000:]
    assert_same_checkpoints(out, reference, range(1, STEPS + 1))


def last_step_seen(agents: list[Run]) -> int:
    return max((int(step) for agent in agents for step in STEP.findall("\n".join(agent.lines))), default=0)


def wait_for_step(agents: list[Run], step: int, timeout: float = 180) -> None:
    """Until either agent's output (its worker's, rank 0's progress) reaches `step`."""
    deadline = time.monotonic() + timeout
    while last_step_seen(agents) < step:
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
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(run.process.pid)
                for process in [*tree.children(recursive=True), tree]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
        for run in self.runs:
            run.wait(timeout=30)


def assert_same_checkpoints(out: Path, expected: Path, steps) -> None:
    """checkpoints/step-N.pt of both runs hold the same weights, N in `steps`; last.pt is the last of them."""
    assert checkpoint.load(out / "last.pt")["train"]["step"] == steps[-1]
    for step in steps:
        name = f"checkpoints/step-{step:08d}.pt"
        a, b = checkpoint.load(out / name)["model"]["weights"], checkpoint.load(expected / name)["model"]["weights"]
        assert [k for k in b if not torch.equal(a[k], b[k])] == [], name


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
    """Rank 0's collective failed. Rank 2 posts nothing more (killed), rank 1 never posted: both are named once
    their posts have stayed away for two periods. Once rank 1 has posted the error that ended it (its last words),
    it is named with them at once."""
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

def test_resuming_mid_epoch_with_another_number_of_processes_continues_the_same_batches(
        reference, converted, tmp_path, capfast_cli, monkeypatch):
    """Step 6 of the two-process run is mid-epoch 1 (4 steps an epoch): one process continues it, noted and
    recorded, and trains its step 7 on the global batch the two processes would have trained on, crops included."""
    from capfast.train.trainer import Trainer

    trained = []
    accumulate = Trainer._accumulate_gradients
    monkeypatch.setattr(Trainer, "_accumulate_gradients",
                        lambda self, batches: trained.extend(batches) or accumulate(self, batches))
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
    ranks = first_batches(converted, world_size=2, epoch=1, skip=2)
    assert len(trained) == 1
    assert torch.equal(trained[0].image_ids, torch.cat([batch.image_ids for batch in ranks]))
    assert torch.equal(trained[0].images, torch.cat([batch.images for batch in ranks]))


def first_batches(data: Path, world_size: int, epoch: int, skip: int) -> list:
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
    return batches


def test_another_number_of_processes_is_refused_mid_epoch_only_where_the_order_depends_on_it():
    from capfast.train.resume import processes_refusal
    from capfast.train.state import TrainState

    def refusal(order: str, batch_in_epoch: int):
        before = TrainState(world_size=2, batch_in_epoch=batch_in_epoch, config={"data": {"order": order}})
        return processes_refusal(before, TrainState(world_size=1))

    assert refusal("random", 2) is None and refusal("sequential", 2) is None and refusal("quasi_random", 0) is None
    assert "processes 2 -> 1 mid-epoch under data.order \"quasi_random\"" in refusal("quasi_random", 2)
