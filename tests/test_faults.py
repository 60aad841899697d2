"""What clusters do to runs, injected on the CPU: signals, a stalled rank, a diverging loss, damaged and foreign
checkpoints, damaged data, a full disk, a read-only or busy --out. Each fault gets one clear line and loses nothing
that was saved (README, "Faults and restarts"). Restarts, and faults across nodes: tests/test_multinode.py."""

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from test_train import TINY

from capfast.models import checkpoint
from capfast.store.beton import BetonContents

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cpu_smoke.toml"
STEP_LINE = re.compile(r"step (\d+)/(\d+)")
LONG = [*TINY, "epochs=40", "progress_seconds=0"]  # 160 steps: long enough to be signalled mid-run


class Run:
    """`capfast train` (or any capfast command line) in a subprocess whose stdout lines are collected as they come."""

    def __init__(self, *args, launcher=(sys.executable, "-m", "capfast"), **popen):
        self.process = subprocess.Popen([*launcher, *map(str, args)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=ROOT, **popen)
        self.lines, self.errors = [], []
        self._readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((self.process.stdout, self.lines), (self.process.stderr, self.errors))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, into: list) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for_step(self, step: int, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [int(m[1]) for m in map(STEP_LINE.search, list(self.lines)) if m]
            if steps and steps[-1] >= step:
                return steps[-1]
            assert self.process.poll() is None, "\n".join(self.errors[-20:])
            time.sleep(0.05)
        raise AssertionError(f"no step {step} within {timeout} s:\n" + "\n".join(self.lines[-5:] + self.errors[-20:]))

    def wait(self, timeout: float = 180) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.errors)


def train_run(data, out, *overrides, flags=(), **popen) -> Run:
    return Run("train", "--config", CONFIG, "--data", data, "--out", out, *flags, *overrides, **popen)


def assert_clean_error(result, *needles):
    """Non-zero exit, no traceback, one error line holding every needle (a resume may add a note line first)."""
    assert result.code != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("capfast: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr


def last_step(out: Path) -> int:
    return checkpoint.load(out / "last.pt")["train"]["step"]


def wait_until_gone(processes, timeout: float = 60) -> None:
    """Nothing of a process tree outlives its launcher."""
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, [p.cmdline() for p in alive]


# ---- signals ----------------------------------------------------------------------------------------------

def test_sigterm_stops_after_the_step_saves_and_exits_75_and_resume_continues(converted, tmp_path):
    run = train_run(converted, tmp_path / "run", *LONG)
    seen = run.wait_for_step(3)
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.stderr
    saved = last_step(tmp_path / "run")
    assert seen <= saved < seen + 5  # the step in progress, not the last epoch's end
    assert f"stopped by SIGTERM at step {saved}" in run.stderr and "Traceback" not in run.stderr
    resumed = train_run(converted, tmp_path / "run", *LONG, f"max_steps={saved + 2}", flags=["--resume"])
    assert resumed.wait() == 0, resumed.stderr
    assert last_step(tmp_path / "run") == saved + 2


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_each_stop_signal_is_noted_once_and_a_second_ctrl_c_stops_at_once(name):
    from capfast.common.signals import StopRequest

    with python_handles_sigint(), StopRequest() as stop:
        os.kill(os.getpid(), signal.Signals[name])
        assert stop.signal == name
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == name  # the first one counts
        if name == "SIGINT":
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_an_ignored_sigint_stays_ignored():
    """A run started in the background (nohup, `&` without job control) is not the target of a terminal's Ctrl-C."""
    from capfast.common.signals import StopRequest

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal is None and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def python_handles_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_and_exits_75_in_one_line(converted, tmp_path):
    """`capfast train --nproc 2` passes the signal to both ranks: they stop after the same step, rank 0 saves, and
    the launcher exits 75 as one process does, with no traceback nor anything of torchrun's, and leaves no process
    behind. (Two nodes' torchrun agents: tests/test_multinode.py.)"""
    run = train_run(converted, tmp_path / "run", *LONG, "model.encoder_depth=1", flags=["--nproc", "2"])
    run.wait_for_step(3, timeout=240)
    tree = psutil.Process(run.process.pid).children(recursive=True)
    assert len([p for p in tree if "capfast" in " ".join(p.cmdline()) and "train" in p.cmdline()]) >= 2
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 75, run.stderr
    wait_until_gone(tree)
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", run.stderr)[1])
    assert last_step(tmp_path / "run") == stopped and stopped < 160
    assert run.errors == ["capfast: SIGTERM received: stopping after the current step (saving last.pt)",
                          f"capfast: stopped by SIGTERM at step {stopped}: {tmp_path / 'run' / 'last.pt'} saved; "
                          f"--resume continues from there"]


def test_the_launcher_exits_with_the_first_failure_and_names_a_rank_killed_by_a_signal(capsys):
    """What `capfast train --nproc N` makes of torchrun's failed ranks; the rank that failed first (torchrun then
    stops the others) gives the exit code; ties in a second go to the one torchrun saw first."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from capfast.common.launch import outcome

    def failed(rank: int, exitcode: int, second: int) -> ProcessFailure:
        failure = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="<N/A>")
        failure.timestamp = second
        return failure

    assert outcome({1: failed(1, 75, 7), 0: failed(0, -15, 7)}) == 75  # stopped, saved; rank 0 then ended by torchrun
    assert outcome({1: failed(1, 2, 3)}) == 2  # a refusal: the rank said why
    assert capsys.readouterr().err == ""
    assert outcome({0: failed(0, -15, 9), 1: failed(1, -9, 8)}) == 128 + 9
    assert capsys.readouterr().err == "capfast: error: rank 1 (pid 101) was killed by SIGKILL\n"


def test_a_stalled_rank_ends_the_job_naming_it_in_one_line(converted, tmp_path, free_port):
    """Rank 1 stops answering (SIGSTOP): rank 0's stall watch ends the job (exit 4) in one line naming it and its
    node, well before the process group's own timeout (dist_timeout_s + 60 s) would end it without a name."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
                "--master_addr=127.0.0.1", "-m", "capfast")
    run = train_run(converted, tmp_path / "run", *LONG, "dist_timeout_s=8", launcher=torchrun)
    run.wait_for_step(3, timeout=240)
    ranks = [p for p in psutil.Process(run.process.pid).children(recursive=True) if "train" in p.cmdline()]
    rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
    rank1.suspend()  # SIGSTOP: the process is there, and answers nothing
    began = time.monotonic()
    named = re.compile(r"capfast: error: rank 0: no training step completed for 8 s .*not responding .*rank 1 on "
                       r"node 0 ")
    try:
        while not named.search(run.stderr):
            assert time.monotonic() - began < 300, run.stderr  # a hang
            time.sleep(0.2)
    finally:
        rank1.resume()  # SIGCONT, rather than wait out torchrun's 30 s before it kills a stopped process
    assert run.wait(timeout=120) == 1 and "exitcode  : 4" in run.stderr, run.stderr  # torchrun's code; rank 0's
    assert len([line for line in run.errors if line.startswith("capfast: error:")]) == 1, run.stderr


# ---- a diverging run --------------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_naming_the_step_and_writes_no_checkpoint(converted, tmp_path,
                                                                                    capfast_cli):
    out = tmp_path / "run"
    assert capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, *TINY, "epochs=1").code == 0
    before = (out / "last.pt").read_bytes()
    result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, "--resume", *TINY,
                         "epochs=3", "optim.lr=1e30", "optim.encoder_lr=1e30", "optim.grad_clip=0")
    assert result.code == 3
    assert_clean_error(result, "not finite (NaN or inf) at step 6", "without writing a checkpoint")
    assert (out / "last.pt").read_bytes() == before  # the good checkpoint is still the newest


def test_non_finite_steps_are_skipped_without_changing_the_weights(converted, tmp_path, capfast_cli):
    """Step 5 (lr 1e30) blows the weights up; steps 6-8 are then non-finite: each is skipped on the device, so
    the weights and the optimizer's state saved after steps 7 and 8 are those after step 6."""
    out = tmp_path / "run"
    assert capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, *TINY, "epochs=1").code == 0
    result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, "--resume", *TINY,
                         "epochs=2", "optim.lr=1e30", "optim.encoder_lr=1e30", "optim.grad_clip=0",
                         "checkpoint_every=1", "nonfinite_skips=10")
    assert result.code == 0, result.stderr  # 3 non-finite steps in a row: fewer than 10
    seventh, eighth = (checkpoint.load(out / "checkpoints" / f"step-0000000{s}.pt") for s in (7, 8))
    assert all(torch.equal(seventh["model"]["weights"][k], v) for k, v in eighth["model"]["weights"].items())
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(seventh["optimizer"]["state"].values(),
                                                              eighth["optimizer"]["state"].values())]
    assert all(torch.equal(a, b) for a, b in moments)


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped_too_without_clipping(converted, tmp_path):
    """optim.grad_clip=0 still measures the gradient norm: an infinite gradient (the loss finite) skips the step,
    so weights and BatchNorm statistics stay as they were."""
    from test_train import TINY as TRAIN_TINY

    from capfast.train.config import load_config
    from capfast.train.trainer import Trainer

    cfg = load_config(CONFIG, [*TRAIN_TINY, "epochs=1", "optim.grad_clip=0", "nonfinite_skips=10"])
    trainer = Trainer(cfg, converted, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    next(trainer.model.decoder.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items() if k in before)


# ---- checkpoints --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_epoch(converted, tmp_path_factory):
    """A run directory after one epoch of TINY (4 steps): last.pt and checkpoints/step-00000004.pt."""
    from test_train import train

    out = tmp_path_factory.mktemp("one_epoch") / "run"
    train(converted, out, "epochs=1")
    return out


def copy_run(one_epoch, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    return out


def resume_cli(capfast_cli, data, out, *overrides):
    return capfast_cli("train", "--config", CONFIG, "--data", data, "--out", out, "--resume", *TINY, "epochs=2",
                       *overrides)


def test_a_checkpoint_with_a_nan_weight_is_refused(one_epoch, converted, tmp_path, capfast_cli):
    out = copy_run(one_epoch, tmp_path)
    state = checkpoint.load(out / "last.pt")
    state["model"]["weights"]["decoder.tok_emb.weight"][3, 5] = float("nan")
    (out / "last.pt").unlink()  # a file of its own, not a link into checkpoints/
    torch.save(state, out / "last.pt")
    shutil.rmtree(out / "checkpoints")
    assert_clean_error(resume_cli(capfast_cli, converted, out), "decoder.tok_emb.weight holds NaN")
    assert_clean_error(capfast_cli("caption", "--checkpoint", out / "last.pt", ROOT / "README.md"),
                       "decoder.tok_emb.weight holds NaN")


def flip_a_bit(path: Path) -> None:
    """In place: the checkpoint file that last.pt links to changes with it."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))


def test_a_flipped_bit_is_refused_and_resume_falls_back_to_the_previous_checkpoint(one_epoch, converted, tmp_path,
                                                                                   capfast_cli):
    out = copy_run(one_epoch, tmp_path)
    assert resume_cli(capfast_cli, converted, out).code == 0  # a second epoch: step-4 and step-8 kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004.pt", "step-00000008.pt"]
    flip_a_bit(out / "last.pt")
    assert_clean_error(capfast_cli("eval", "--checkpoint", out / "last.pt", "--data", converted),
                       "is damaged", "does not match its checksum")
    result = resume_cli(capfast_cli, converted, out, "epochs=3")
    assert result.code == 0, result.stderr
    assert re.search(r"warning: checkpoint .*last.pt is damaged: .* does not match its checksum .*: resuming from "
                     r".*step-00000004.pt instead", result.stderr), result.stderr


def test_loading_a_checkpoint_never_runs_its_code(one_epoch, converted, tmp_path, capfast_cli):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = checkpoint.load(one_epoch / "last.pt")
    state["extra"] = Payload()
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / "last.pt")
    init = f"init_from=\"{out / 'last.pt'}\""
    results = [capfast_cli("eval", "--checkpoint", out / "last.pt", "--data", converted),
               capfast_cli("caption", "--checkpoint", out / "last.pt", ROOT / "README.md"),
               capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", tmp_path / "b", *TINY, init),
               resume_cli(capfast_cli, converted, out)]
    for result in results:
        assert_clean_error(result, "refusing", "would run their code")
    assert not marker.exists()


def test_training_data_replaced_under_resume_is_refused(one_epoch, converted, tmp_path, capfast_cli):
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    shutil.copy(converted / "val.beton", data / "train.beton")  # 12 records instead of 32
    result = resume_cli(capfast_cli, data, copy_run(one_epoch, tmp_path))
    assert_clean_error(result, "the training data changed", "records 32 -> 12")


def test_stale_temporary_files_of_killed_saves_are_removed_at_start(one_epoch, converted, tmp_path, capfast_cli):
    out = copy_run(one_epoch, tmp_path)
    stale = [out / ".last.pt.link.tmp", out / "checkpoints" / ".step-00000005.pt.k2j4x_9a.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    assert resume_cli(capfast_cli, converted, out).code == 0
    assert not any(path.exists() for path in stale)


def test_kill_9_while_saving_every_step_leaves_a_loadable_last_pt(converted, tmp_path):
    out = tmp_path / "run"
    run = train_run(converted, out, *LONG, "checkpoint_every=1", flags=["--auto-resume"])
    run.wait_for_step(3)
    run.process.kill()  # most of a step here goes to writing its checkpoint
    run.wait()
    assert checkpoint.load(out / "last.pt")["train"]["step"] >= 2
    finish = train_run(converted, out, *LONG, "checkpoint_every=1", f"max_steps={last_step(out) + 2}",
                       flags=["--auto-resume"])
    assert finish.wait() == 0, finish.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ---- the run directory -----------------------------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(converted, tmp_path, capfast_cli):
    """A run holds OUT/.lock; here a process that takes it the way a run does, then is killed with -9."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from capfast.common.lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", out],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in ([], ["--resume"], ["--auto-resume"]):
            result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, *flags, *TINY)
            assert_clean_error(result, f"is in use by pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", out, "--auto-resume", *TINY,
                         "epochs=1")  # the kernel dropped the lock with the killed process
    assert result.code == 0, result.stderr


def test_an_unwritable_out_is_one_line_before_any_work(converted, tmp_path, capfast_cli, monkeypatch):
    from capfast.train import trainer

    built = []  # a Trainer built: the model, the loader and ffcv's compile were under way
    monkeypatch.setattr(trainer, "Trainer", lambda *args, **kwargs: built.append(args))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_clean_error(capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", blocker / "run"),
                       "cannot create --out")
    assert built == []
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", readonly], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", readonly, *TINY)
        assert_clean_error(result, "--out", "is not writable: Read-only file system")
        assert built == []
    finally:
        subprocess.run(["umount", readonly])


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_checkpoint(one_epoch, converted, tmp_path):
    out = copy_run(one_epoch, tmp_path)
    before = (out / "last.pt").read_bytes()
    limit = len(before) // 2  # files may not grow past half a checkpoint: the next save cannot be written

    def small_files():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = train_run(converted, out, *TINY, "epochs=2", flags=["--resume"], preexec_fn=small_files,
                    restore_signals=False)
    assert run.wait() != 0
    errors = [line for line in run.errors if "error" in line]
    assert len(errors) == 1 and "cannot write checkpoint" in errors[0] and "File too large" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    assert (out / "last.pt").read_bytes() == before and checkpoint.load(out / "last.pt")["train"]["step"] == 4


def test_validation_asked_for_needs_its_split_at_start(converted, tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", CONFIG, "--data", converted, "--out", tmp_path / "r", *TINY,
                         "eval.every_epochs=1", "data.val_split=vall")
    assert_clean_error(result, "data.val_split", "vall.beton not found", "eval.every_epochs=0")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_refusal_every_rank_meets_is_one_line_under_nproc(converted, tmp_path):
    """Both ranks of `--nproc 2` refuse a missing validation split, after joining the process group; the refusal
    is printed once (once per node: both ranks are on this one) and is what the launcher exits with."""
    run = train_run(converted, tmp_path / "r", *TINY, "eval.every_epochs=1", "data.val_split=vall",
                    flags=["--nproc", "2"])
    assert run.wait(timeout=240) == 2, run.stderr
    assert len(run.errors) == 1 and run.errors[0].startswith("capfast: error: data.val_split:"), run.stderr
    assert "vall.beton not found" in run.errors[0]


def test_the_epoch_is_saved_before_its_validation(converted, tmp_path, capfast_cli):
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    (data / "refs_val.json").write_text("{damaged")  # there at the start; unreadable when epoch 1 is validated
    result = capfast_cli("train", "--config", CONFIG, "--data", data, "--out", tmp_path / "run", *TINY, "epochs=2",
                         "eval.every_epochs=1")
    assert_clean_error(result, "refs_val.json", "is not valid JSON")
    assert last_step(tmp_path / "run") == 4  # epoch 1 is not lost


# ---- damaged data ---------------------------------------------------------------------------------------

def damaged_copy(converted, tmp_path, damage) -> Path:
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    contents = BetonContents(data / "val.beton")
    raw = np.memmap(data / "val.beton", dtype=np.uint8, mode="r+")
    damage(contents, raw)
    raw.flush()
    return data


def zero_jpeg(record: int):
    def damage(contents, raw):
        ptr = int(contents.image_meta["data_ptr"][record])
        raw[ptr:ptr + contents.sizes[ptr]] = 0
    return damage


def test_a_zeroed_jpeg_is_an_error_naming_the_record(converted, tmp_path, capfast_cli, one_epoch):
    data = damaged_copy(converted, tmp_path, zero_jpeg(3))
    image_id = int(BetonContents(data / "val.beton").image_ids[3])
    assert_clean_error(capfast_cli("inspect", data / "val.beton"), "record 3", f"image {image_id}",
                       "not a complete JPEG")
    assert_clean_error(capfast_cli("eval", "--checkpoint", one_epoch / "last.pt", "--data", data, "--beam", "1",
                                   "--no-meteor", "--no-blind"),
                       "record 3", f"image {image_id}", "not a valid JPEG")


def test_a_token_id_outside_the_vocabulary_is_refused_before_step_1(converted, tmp_path, capfast_cli, one_epoch):
    def bad_token(contents, raw):
        ptr = int(contents.caption_ptrs[5])
        raw[ptr + 4:ptr + 8] = np.frombuffer(np.int32(65535).tobytes(), np.uint8)

    data = damaged_copy(converted, tmp_path, bad_token)
    assert_clean_error(capfast_cli("inspect", data / "val.beton"), "record 5", "token id 65535")
    shutil.copy(data / "val.beton", data / "train.beton")
    shutil.copy(data / "refs_val.json", data / "refs_train.json")
    result = capfast_cli("train", "--config", CONFIG, "--data", data, "--out", tmp_path / "r", *TINY,
                         "data.batch_size=4")
    assert_clean_error(result, "record 5", "token id 65535", "outside the vocabulary")


def test_every_rank_answers_resume_or_start_alike(tmp_path):
    from capfast.train.cli import resumes

    assert resumes(tmp_path, resume=True, auto_resume=True)  # --resume wins: then its missing last.pt is an error
    assert not resumes(tmp_path, resume=False, auto_resume=True)
    (tmp_path / "last.pt").write_bytes(b"")
    assert resumes(tmp_path, resume=False, auto_resume=True) and not resumes(tmp_path, False, False)
