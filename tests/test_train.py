"""Trainer on CPU with a tiny model: learning, bf16, resume equivalence, TensorBoard scalars, DDP parity."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capfast.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# The tests' recipe: 32 training images in 4 steps of 8 per epoch. On all 4 stages of ResNet-18 a step takes
# ~0.2 s on 2 cores and a checkpoint 134 MB: test_faults signals its runs at a step and times that against it.
TINY = [
    "model.encoder=\"resnet18\"", "model.encoder_depth=4",
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.dropout=0.0",
    "data.image_size=32", "data.batch_size=8", "data.workers=1", "eval.every_epochs=0", "precision=\"fp32\"",
    "encoder_trainable_from_epoch=0", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.encoder_lr=3e-3",
    "checkpoint_every=0", "optim.label_smoothing=0.0",
]
# TINY on ResNet-18's first 2 stages: ~15 ms steps and 8 MB checkpoints, for every test that does not race a step.
SHALLOW = [*TINY, "model.encoder_depth=2"]


def train(data, out, *overrides, resume=False, recipe=TINY):
    """Trains `recipe` with `overrides` in this process; returns the run's summary."""
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [*recipe, *overrides])
    return Trainer(cfg, data, out, resume=resume).train()


def test_tiny_model_learns_and_logs_every_step(converted, tmp_path, tb_scalars):
    summary = train(converted, tmp_path / "run", "epochs=20", recipe=SHALLOW)
    steps = summary["step"]
    assert steps == 20 * (32 // 8)
    scalars = tb_scalars(tmp_path / "run")
    for tag in ("train/loss", "train/lr", "perf/images_per_sec", "perf/step_time_ms", "perf/data_wait_ms"):
        assert sorted(scalars[tag]) == list(range(1, steps + 1)), tag
    losses = scalars["train/loss"]
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (steps - 2, steps - 1, steps)) / 3
    assert last < 0.6 * first, (first, last)
    assert all(v > 0 for v in scalars["perf/images_per_sec"].values())
    assert (tmp_path / "run" / "last.pt").is_file()


def test_bf16_autocast_on_cpu(converted, tmp_path, tb_scalars):
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [*SHALLOW, "epochs=1", "precision=\"bf16\""])
    trainer = Trainer(cfg, converted, tmp_path / "run")
    computed_in = set()
    for layer in (trainer.model.encoder.trunk.conv1, trainer.model.decoder.blocks[0].mlp.net[0]):
        layer.register_forward_hook(lambda module, inputs, output: computed_in.add(output.dtype))
    trainer.train()
    assert computed_in == {torch.bfloat16}  # the convolutions and matmuls ran in bf16, not just the loss
    losses = tb_scalars(tmp_path / "run")["train/loss"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_resume_follows_the_uninterrupted_run(converted, tmp_path, tb_scalars):
    train(converted, tmp_path / "full", "epochs=3", recipe=SHALLOW)
    train(converted, tmp_path / "cut", "epochs=3", "max_steps=6", recipe=SHALLOW)  # mid-epoch 1 (4 steps per epoch)
    train(converted, tmp_path / "cut", "epochs=3", resume=True, recipe=SHALLOW)
    full = tb_scalars(tmp_path / "full")["train/loss"]
    cut = tb_scalars(tmp_path / "cut")["train/loss"]
    assert sorted(cut) == sorted(full) == list(range(1, 13))
    for step in full:
        assert cut[step] == pytest.approx(full[step], rel=1e-4, abs=1e-5), step


def first_step(data: Path, out: Path, overrides: list[str]) -> tuple[dict, bool]:
    """The loss, gradients and image ids of a Trainer's first step -- this process's shard of it under torchrun --
    and whether this is the main process."""
    from capfast.train.trainer import Trainer

    trainer = Trainer(load_config(ROOT / "configs" / "cpu_smoke.toml", overrides), data, out)
    trainer._set_encoder_trainable(0)
    # closing stops ffcv's prefetch thread: exiting under a running numba parallel loop aborts the process
    with contextlib.closing(trainer.train_loader.epoch(0)) as epoch:
        batch = next(epoch)
    loss = trainer._accumulate_gradients([batch])
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return ({"loss": loss.item(), "grads": grads, "ids": batch.image_ids, "images": batch.images},
            trainer.dist.is_main)


DDP_SCRIPT = r"""
import sys, torch
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]  # this checkout's capfast and tests
from test_train import first_step
from capfast.common import distributed
step, is_main = first_step(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
if is_main:
    torch.save(step, Path(sys.argv[3]) / "step1.pt")
distributed.shutdown()
"""
# A trainable encoder whose BatchNorm normalizes with its stored statistics (model.batchnorm=frozen): each image's
# features do not depend on the rest of its batch.
DDP_RECIPE = [*SHALLOW, "model.batchnorm=frozen"]


def test_two_gloo_processes_match_one_process(converted, tmp_path, free_port):
    """What N ranks x B/N share with 1 x B: the batch and its crops exactly (rank 0 reads the first half), and,
    BatchNorm frozen, the loss and gradients up to float summation order. Over many steps these rounding
    differences compound, so the weights of the two runs drift apart (README, Design notes)."""
    one, _ = first_step(converted, tmp_path / "one", DDP_RECIPE)
    out = tmp_path / "two"
    out.mkdir()
    (out / "step.py").write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
           "--master_addr=127.0.0.1", out / "step.py", ROOT, converted, out, *DDP_RECIPE]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out / "step1.pt")
    half = len(one["ids"]) // 2
    assert torch.equal(two["ids"], one["ids"][:half]) and torch.equal(two["images"], one["images"][:half])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    assert "encoder.trunk.conv1.weight" in one["grads"] and "encoder.trunk.bn1.weight" in one["grads"]
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_equals_one_big_batch(converted, tmp_path):
    """2 micro-batches of 4 give the gradient of 1 batch of 8 (same records; full-image crops; a trainable
    encoder with frozen BatchNorm statistics)."""
    from capfast.train.trainer import Trainer

    def first_step_grads(batch_size: int, accum: int) -> dict:
        cfg = load_config(ROOT / "configs" / "cpu_smoke.toml",
                          [*SHALLOW, f"data.batch_size={batch_size}", f"optim.grad_accum={accum}",
                           "data.crop_scale=[1.0, 1.0]", "model.batchnorm=frozen"])
        trainer = Trainer(cfg, converted, tmp_path / f"run{accum}")
        trainer._set_encoder_trainable(0)
        epoch = trainer.train_loader.epoch(0)
        micro = [next(epoch) for _ in range(accum)]
        epoch.close()
        loss = trainer._accumulate_gradients(micro)
        ids = torch.cat([b.image_ids for b in micro])
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return {"loss": loss.item(), "ids": ids.tolist(), "grads": grads}

    one, two = first_step_grads(8, 1), first_step_grads(4, 2)
    assert one["ids"] == two["ids"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- bad input: one line, no traceback, non-zero exit ---------------------------------------------------

def assert_clean_error(result, *needles):
    assert result.code != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "error" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_data_dir(tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", tmp_path / "nope",
                         "--out", tmp_path / "r")
    assert_clean_error(result, "data directory not found")


def test_missing_config(converted, tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", tmp_path / "none.toml", "--data", converted, "--out", tmp_path / "r")
    assert_clean_error(result, "config file not found")


def test_unknown_key_suggests_the_closest(converted, tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "r",
                       "optim.lr_warmup=3")
    assert_clean_error(result, "unknown config key 'optim.lr_warmup'", "did you mean")


def test_fp16_on_cpu_is_refused(converted, tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "r",
                       "precision=fp16", "device=cpu")
    assert_clean_error(result, "fp16")


def test_vocab_not_matching_the_beton(converted, tmp_path, capfast_cli):
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    vocab = json.loads((data / "vocab.json").read_text())
    vocab["words"] = vocab["words"][:4] + list(reversed(vocab["words"][4:]))
    (data / "vocab.json").write_text(json.dumps(vocab))
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", data,
                         "--out", tmp_path / "r")
    assert_clean_error(result, "different vocabulary")


def test_resume_refuses_changes_that_break_continuing_exactly(converted, tmp_path, capfast_cli):
    train(converted, tmp_path / "run", "epochs=2", "max_steps=3", recipe=SHALLOW)
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "run",
                         "--resume", *SHALLOW, "epochs=2", "model.d_model=64", "data.batch_size=16", "seed=7")
    assert_clean_error(result, "model.d_model 32 -> 64", "data.batch_size 8 -> 16", "seed 0 -> 7")


def test_resume_applies_and_records_safe_changes(converted, tmp_path, capfast_cli, tb_scalars):
    from capfast.train.optim import lr_factor

    run = tmp_path / "run"
    train(converted, run, "epochs=2", "max_steps=3", recipe=SHALLOW)
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", converted,
                         "--out", run,
                         "--resume", *SHALLOW, "epochs=3", "max_steps=5", "optim.lr=1e-3")
    assert result.code == 0, result.stderr
    assert "changed settings: optim.lr 0.003 -> 0.001, epochs 2 -> 3, max_steps 3 -> 5" in result.stderr
    history = json.loads((run / "config.json").read_text())["history"]
    assert history == [{"step": 3, "changes": {"epochs": [2, 3], "max_steps": [3, 5], "optim.lr": [0.003, 0.001]}}]
    lrs = tb_scalars(run)["train/lr"]
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    # the new lr on the schedule of the new length (3 epochs of 4 steps), from the step where the run resumed
    assert lrs[4] == pytest.approx(1e-3 * lr_factor(3, 12, 2, 0.01), rel=1e-6)


def test_existing_run_needs_resume(converted, tmp_path, capfast_cli):
    train(converted, tmp_path / "run", "epochs=1", recipe=SHALLOW)
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "run")
    assert_clean_error(result, "--resume")


def test_nproc_launches_ddp_processes(converted, tmp_path, tb_scalars, capfast_cli, monkeypatch):
    """`capfast train --nproc 2`, called in this process: it launches torchrun, whose 2 ranks train together."""
    monkeypatch.chdir(ROOT)  # the ranks run `python -m capfast`: this checkout's
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    result = capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "run", "--nproc", "2", *SHALLOW, "epochs=1")
    assert result.code == 0, result.stderr  # the ranks' own output: pytest's captured stdout and stderr
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # torchrun's agent ran in this process
    assert (tmp_path / "run" / "last.pt").is_file()
    scalars = tb_scalars(tmp_path / "run")
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]  # global batch 8: 4 steps
    slowest, rank0 = scalars["perf/data_wait_slowest_ms"], scalars["perf/data_wait_ms"]
    # the slowest rank's wait is all-reduced as float32, rank 0's own is a float64
    assert sorted(slowest) == [1, 2, 3, 4] and all(slowest[s] >= rank0[s] * (1 - 1e-6) for s in rank0)
    assert sorted(scalars["perf/step_time_slowest_ms"]) == [1, 2, 3, 4]  # beside it, the slowest rank's step
