"""Training from a frozen trunk's cached features (`capfast features`, data.features): the same loss and captions
as the trunk on the fly, the image loader's order guarantees, safe to kill, and one line for every bad cache."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import Run, assert_clean_error
from test_train import DDP_SCRIPT, SHALLOW

from capfast.models import checkpoint
from capfast.store.feature_cache import FeatureCache, cache_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cpu_smoke.toml"
FROZEN = [o for o in SHALLOW if not o.startswith("encoder_trainable_from_epoch")] + ["encoder_trainable_from_epoch=-1"]


def features_argv(data, name, source, *more):
    return ["features", "--data", data, "--name", name, "--from", source, "--batch-size", "8", "--workers", "1",
            *more]


def cli(*args) -> int:
    from capfast.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def load(overrides, data, out, resume=False):
    from capfast.train.config import load_config
    from capfast.train.trainer import Trainer

    return Trainer(load_config(CONFIG, [*FROZEN, *overrides]), data, out, resume=resume)


@pytest.fixture(scope="module")
def cached(converted, tmp_path_factory):
    """A data directory with a tiny trained model's trunk cached in fp32 ("fp32") and in fp16 with both views
    ("fp16"), and that model (init_from)."""
    root = tmp_path_factory.mktemp("cached")
    data = root / "data"
    shutil.copytree(converted, data)
    load(["epochs=1"], data, root / "xe").train()
    start = root / "xe" / "last.pt"
    assert cli(*features_argv(data, "fp32", start, "--dtype", "fp32")) == 0
    assert cli(*features_argv(data, "fp16", start, "--flip")) == 0
    return data, start


def init(start) -> str:
    return f"init_from=\"{start}\""


def test_the_first_step_from_the_cache_has_the_loss_of_the_trunk_on_the_fly(cached, tmp_path):
    """fp32 on the CPU, the same images and crop (the whole image: crop scale and ratio 1 on square images)."""
    data, start = cached
    from_cache = load([init(start), "data.features=\"fp32\""], data, tmp_path / "a")
    on_the_fly = load([init(start), "data.crop_scale=[1.0, 1.0]", "data.crop_ratio=[1.0, 1.0]"], data, tmp_path / "b")
    losses = []
    for trainer in (from_cache, on_the_fly):
        trainer._set_encoder_trainable(0)
        with contextlib.closing(trainer.train_loader.epoch(0)) as epoch:
            batch = next(epoch)
        losses.append((batch.image_ids.tolist(), float(trainer._accumulate_gradients([batch]))))
    assert losses[0][0] == losses[1][0]
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-5, abs=1e-5)


def test_two_gloo_processes_from_the_cache_give_one_process_s_gradients(cached, tmp_path, free_port):
    data, start = cached
    overrides = [*FROZEN, init(start), "data.features=\"fp32\""]
    one = load(overrides[len(FROZEN):], data, tmp_path / "one")
    one._set_encoder_trainable(0)
    with contextlib.closing(one.train_loader.epoch(0)) as epoch:
        loss = float(one._accumulate_gradients([next(epoch)]))
    script = tmp_path / "step.py"
    script.write_text(DDP_SCRIPT)
    (tmp_path / "two").mkdir()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port}", "--master_addr=127.0.0.1", script, ROOT, data,
                             tmp_path / "two", *overrides], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "step1.pt")
    assert two["loss"] == pytest.approx(loss, rel=1e-5)
    grads = {n: p.grad for n, p in one.model.named_parameters() if p.grad is not None}
    assert grads.keys() == two["grads"].keys() and not any(n.startswith("encoder.trunk.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_trained_from_the_cache_captions_raw_images_as_the_cache_does(cached, tmp_path):
    from capfast.data import LoaderOptions, build_feature_loader, build_loader
    from capfast.eval.evaluate import generate_split
    from capfast.models.generate import GenerationOptions
    from capfast.models.load import load_model

    data, start = cached
    load([init(start), "data.features=\"fp32\"", "epochs=1"], data, tmp_path / "run").train()
    model, record = load_model(tmp_path / "run" / "last.pt")
    options, generation = LoaderOptions(batch_size=4, image_size=record.image_size), GenerationOptions(beam_size=2)
    images = build_loader(data / "val.beton", options, train=False, normalization=model.normalization)
    from_images = generate_split(model, images, record.vocab, generation=generation).results
    model.set_reads_trunk_features(True)
    features = build_feature_loader(data, "fp32", "val", options, train=False)
    assert generate_split(model, features, record.vocab, generation=generation).results == from_images
    assert len(from_images) == 12


def test_ranks_read_their_rows_of_the_global_batch_and_views_alike(cached):
    """N ranks x B/N read what 1 x B reads, flipped views included, and a resumed epoch skips what it read."""
    from capfast.data import LoaderOptions, build_feature_loader
    from capfast.data.feature_loader import FeatureLoader
    from capfast.data.order import Shard

    data, _ = cached
    one = build_feature_loader(data, "fp16", "train", LoaderOptions(batch_size=8), train=True, seed=3)
    whole = list(one.epoch(1))
    parts = [FeatureLoader(one.cache, one.features, one.contents, dataclasses.replace(one.settings, batch_size=4),
                           Shard(rank, 2)) for rank in (0, 1)]
    halves = [list(part.epoch(1)) for part in parts]
    for b, batch in enumerate(whole):
        for field in ("images", "captions", "image_ids"):
            joined = torch.cat([getattr(halves[r][b], field) for r in (0, 1)])
            assert torch.equal(joined, getattr(batch, field)), (b, field)
    resumed = list(one.epoch(1, skip_batches=2))
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, whole[2:])) and len(resumed) == len(whole) - 2


def test_both_views_are_read_in_training_and_only_the_centre_in_evaluation(cached):
    from capfast.data import LoaderOptions, build_feature_loader

    data, _ = cached
    cache = FeatureCache.open(data, "fp16")
    stored = np.asarray(cache.split("train", cache.manifest["splits"]["train"]["source"]))
    train = build_feature_loader(data, "fp16", "train", LoaderOptions(batch_size=8), train=True)
    order = train.rank_order(0)
    views = []
    for b, batch in enumerate(train.epoch(0)):
        for i, record in enumerate(order[b * 8:(b + 1) * 8]):
            got = batch.images[i].numpy()
            view = [v for v in (0, 1) if np.array_equal(got, stored[record, v].astype(np.float32))]
            assert len(view) == 1, record
            views += view
    assert 0 < sum(views) < len(views)
    val = build_feature_loader(data, "fp16", "val", LoaderOptions(batch_size=4), train=False)
    first = next(iter(val.epoch(0)))
    assert np.array_equal(first.images.numpy(), np.asarray(FeatureCache.open(data, "fp16").split(
        "val", cache.manifest["splits"]["val"]["source"])[:4, 0]).astype(np.float32))


def test_kill_9_mid_epoch_then_resume_from_the_cache_is_exact(cached, tmp_path):
    data, start = cached
    run = [init(start), "data.features=\"fp32\"", "epochs=3", "checkpoint_every=2", "model.dropout=0.1",
           "progress_seconds=0"]
    load([*run, "max_steps=8"], data, tmp_path / "full").train()
    cut = Run("train", "--config", CONFIG, "--data", data, "--out", tmp_path / "cut", *FROZEN, *run)
    cut.wait_for_step(5)
    cut.process.send_signal(signal.SIGKILL)
    cut.wait()
    assert checkpoint.load(tmp_path / "cut" / "last.pt")["train"]["step"] in (4, 5, 6)  # mid-epoch 2
    load([*run, "max_steps=8"], data, tmp_path / "cut", resume=True).train()
    a, b = (checkpoint.load(tmp_path / r / "last.pt") for r in ("full", "cut"))
    assert a["train"]["step"] == b["train"]["step"] == 8
    assert all(torch.equal(v, b["model"]["weights"][k]) for k, v in a["model"]["weights"].items())


def test_kill_9_during_extraction_then_a_rerun_writes_the_same_bytes(cached, tmp_path):
    data, start = cached
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("features"))
    argv = features_argv(copy, "fp32", start, "--dtype", "fp32", "--split", "train", "--batch-size", "2")
    killed = Run(*argv)
    done = cache_dir(copy, "fp32") / "train.done"
    deadline = time.monotonic() + 180
    while not (done.exists() and 0 < np.fromfile(done, np.uint8).sum() < 32) and time.monotonic() < deadline:
        assert killed.process.poll() is None, killed.stderr
        time.sleep(0.02)
    killed.process.send_signal(signal.SIGKILL)
    killed.wait()
    assert "train" not in FeatureCache.open(copy, "fp32").manifest["splits"]  # nothing that looks complete
    assert cli(*argv) == 0
    written = cache_dir(copy, "fp32") / "train.features"
    assert written.read_bytes() == (cache_dir(data, "fp32") / "train.features").read_bytes()
    assert sorted(p.name for p in cache_dir(copy, "fp32").iterdir()) == ["manifest.json", "train.features"]


def test_two_ranks_write_what_one_wrote_and_a_complete_split_is_not_computed_again(cached, tmp_path, capfast_cli):
    """Each rank writes the batches of its contiguous share (here the two shares of a 2-process run, written one
    after the other in this process: the files are all that ranks share); another batch size and worker count
    agree to the dtype's precision."""
    from capfast.common.distributed import DistInfo
    from capfast.data.loader import CaptionLoader
    from capfast.data.order import Shard
    from capfast.extract.features import Extraction, _loader, _write_batches
    from capfast.models.load import load_model
    from capfast.store.feature_cache import SplitWriter

    data, start = cached
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("features"))
    model = load_model(start)[0]
    cache = FeatureCache.create(copy, "two", model.trunk_id(), "fp32", FeatureCache.open(data, "fp32").shape,
                                ("center",))
    writer = SplitWriter(cache, "val", FeatureCache.open(data, "fp32").manifest["splits"]["val"]["source"])
    writer.prepare()
    extraction = Extraction(copy, "two", "fp32", batch_size=6, workers=2)
    one_rank = _loader(extraction, copy / "val.beton", model, None, torch.device("cpu"), DistInfo())
    for rank in (0, 1):
        loader = CaptionLoader(one_rank.beton, one_rank.settings, Shard(rank, 2))
        _write_batches(extraction, writer, loader, model, None, "val")
    writer.finish()
    two = np.fromfile(cache_dir(copy, "two") / "val.features", np.float32)
    one = np.fromfile(cache_dir(data, "fp32") / "val.features", np.float32)
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)
    rerun = capfast_cli(*features_argv(copy, "two", start, "--dtype", "fp32", "--split", "val"))
    assert rerun.code == 0 and "features val: already complete" in rerun.stdout, rerun.stderr


def test_bad_caches_are_one_line(cached, tmp_path, capfast_cli, converted):
    data, start = cached
    copy = tmp_path / "data"
    shutil.copytree(data, copy)

    def train(*overrides):
        return capfast_cli("train", "--config", CONFIG, "--data", copy, "--out", tmp_path / "run", *FROZEN,
                           init(start), *overrides)

    assert_clean_error(train("data.features=\"nope\""), "no feature cache 'nope'")
    assert_clean_error(train("data.features=\"fp32\"", "encoder_trainable_from_epoch=0"),
                       "would train the trunk")
    assert_clean_error(train("data.features=\"fp32\"", "data.image_size=48"),
                       "was not made by this run's trunk", "image_size 32 (cache) vs 48")
    other = capfast_cli("train", "--config", CONFIG, "--data", copy, "--out", tmp_path / "other", *FROZEN,
                        "data.features=\"fp32\"", "seed=1")  # a random trunk of its own
    assert_clean_error(other, "was not made by this run's trunk", "weights")
    assert_clean_error(train("data.features=\"fp32\"", "eval.every_epochs=1", "data.val_split=\"train2\""),
                       "train2.beton not found")

    manifest = cache_dir(copy, "fp32") / "manifest.json"
    values = json.loads(manifest.read_text())
    del values["splits"]["val"]
    manifest.write_text(json.dumps(values))
    assert_clean_error(train("data.features=\"fp32\"", "eval.every_epochs=1"), "split 'val' is not in it")

    features = cache_dir(copy, "fp32") / "train.features"
    os.truncate(features, features.stat().st_size // 2)
    assert_clean_error(train("data.features=\"fp32\""), "is truncated or damaged")

    shutil.copyfile(copy / "val.beton", copy / "train.beton")  # other data under the same name
    assert_clean_error(train("data.features=\"fp16\""), "split 'train' changed since its features were made")


def test_extraction_into_a_read_only_data_directory_is_one_line(cached, tmp_path, capfast_cli):
    data, start = cached
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(data, mount / "data", ignore=shutil.ignore_patterns("features"))
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        result = capfast_cli(*features_argv(mount / "data", "x", start))
        assert_clean_error(result, "feature cache folder", "Read-only file system")
    finally:
        subprocess.run(["umount", mount])
