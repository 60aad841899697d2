"""Shared fixtures: a tiny synthetic COCO dataset and its converted betons, plus the `gpu` marker's skip hook.
Every test process (pytest-xdist's workers too) runs under capfast's process settings (capfast.common.runtime),
as the `capfast` command does.

Both datasets are session-scoped and must be treated as read-only; copy them (shutil.copytree) before changing.
Under pytest-xdist the workers share one copy of each (built by the first to ask), and the modules listed in
ONE_WORKER_MODULES run on one worker each, so that their module-scoped fixtures too are built once.
"""

import contextlib
import os
import shutil
from pathlib import Path

import pytest

# One intra-op thread in each test process and in the processes they start: two pytest-xdist workers already keep
# two cores busy, and torch's OpenMP threads spin-waiting for a core multiplied the suite's CPU time (6x for
# test_decoding.py and test_models.py on a busy machine). Before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
SYNTH_TRAIN, SYNTH_VAL = 32, 12
CONVERTED_IMAGE_SIZE = 64


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A directory that build(path) fills, built once per test session: under pytest-xdist by the first worker to
    ask, the others waiting on a lock and then taking it as it is."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    import fcntl

    root = tmp_path_factory.getbasetemp().parent  # the session's, above each worker's own
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            with contextlib.suppress(FileNotFoundError):  # what a worker that failed half-way left
                shutil.rmtree(path)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def synth_coco(tmp_path_factory):
    """Root of a synthetic COCO captions dataset (capfast.pack.synth layout):
    images/{train,val}/*.jpg, annotations/captions_{train,val}.json and dataset_coco.json (Karpathy)."""
    from capfast.pack.synth import make_synthetic_coco

    def build(root):
        make_synthetic_coco(root, n_train=SYNTH_TRAIN, n_val=SYNTH_VAL, seed=0, karpathy=True)

    return shared_dir(tmp_path_factory, "synth_coco", build)


@pytest.fixture(scope="session")
def converted(synth_coco, tmp_path_factory):
    """A data dir holding train.beton, val.beton, refs_{train,val}.json, vocab.json and meta.json,
    converted at 64x64 with min_count=1 and 2 workers (5 captions per image, max_len 16)."""
    from capfast.pack.convert import convert

    def build(out):
        for split in ("train", "val"):
            convert(out, split, annotations=synth_coco / "annotations" / f"captions_{split}.json",
                    images=synth_coco / "images" / split, image_size=CONVERTED_IMAGE_SIZE, min_count=1,
                    workers=2, progress=False)

    return shared_dir(tmp_path_factory, "converted", build)


def pytest_configure(config):
    from capfast.common.runtime import prepare_process

    prepare_process()  # before any test module imports ffcv
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(ModulesOnOneWorker())


# Modules whose tests share a costly module-scoped fixture (a trained run, a running METEOR jar): under pytest-xdist
# each goes to one worker as a whole, so that the fixture is built once rather than on every worker; every other
# test is sent on its own. (--dist loadgroup would do it with marks, but lost its grouping with pytest 9.2:
# pytest-dev/pytest-xdist#1386.)
ONE_WORKER_MODULES = {"test_decoding.py", "test_encoders.py", "test_eval.py", "test_features.py", "test_metrics.py",
                      "test_reporter.py", "test_run_state.py", "test_scst.py"}
# Modules whose tests run jobs of several processes against torchrun's clocks (its agent kills a rank that has not
# ended 30 s after its SIGTERM): one worker runs them one after another, so that two such jobs never share the two
# cores. Run side by side, a survivor of test_multinode's kill test was once killed so before it said whom it lost.
ONE_WORKER_GROUPS = {"test_faults.py": "torchrun jobs", "test_multinode.py": "torchrun jobs"}


class ModulesOnOneWorker:
    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "load":  # what -n gives; a --dist asked for is left alone
            return None
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0]
                name = module.rsplit("/", 1)[-1]
                if name in ONE_WORKER_GROUPS:
                    return ONE_WORKER_GROUPS[name]
                return module if name in ONE_WORKER_MODULES else nodeid

        return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def capfast_cli(capsys):
    """Runs the real `capfast` CLI entry point in-process: capfast_cli("convert", "--out", d, ...) ->
    CliResult(code, stdout, stderr). In-process keeps ffcv's 5 s import to once per test session."""
    from dataclasses import dataclass

    from capfast.cli import main

    @dataclass
    class CliResult:
        code: int
        stdout: str
        stderr: str

    def run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def read_tb_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted((run_dir / "tb").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


@pytest.fixture
def tb_scalars():
    """read_tb_scalars(run_dir) -> {tag: {step: value}} from the run's TensorBoard event files."""
    return read_tb_scalars


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds() -> float:
    """User+system CPU of this process and of its children that have finished and been waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """CAPFAST_TEST_CPU=path appends one line per test: CPU seconds (this process and its finished children),
    wall seconds, xdist worker, node id; setup, call and teardown together, so a fixture counts in the first test
    of its scope on each worker. `sort -rn path | head` lists where the suite's CPU goes (robust on a loaded
    machine, unlike wall time)."""
    import time

    path = os.environ.get("CAPFAST_TEST_CPU")
    if not path:
        yield
        return
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "-")
    line = f"{_cpu_seconds() - cpu:9.2f} {time.perf_counter() - wall:9.2f} {worker} {item.nodeid}\n"
    with open(path, "a") as f:  # one short append per test: safe beside the other xdist workers
        f.write(line)
