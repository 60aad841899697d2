"""`capfast eval` and `capfast caption` on a tiny trained checkpoint, plus validation inside training."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import assert_clean_error

from capfast.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}


@pytest.fixture(scope="session")
def trained_run(converted, tmp_path_factory):
    """Two epochs of a tiny model with validation after each: last.pt, best.pt and TensorBoard events."""
    from capfast.train.trainer import Trainer

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [
        "model.encoder=resnet18", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "data.image_size=32", "data.batch_size=8", "data.workers=1", "epochs=2", "precision=fp32",
        "eval.every_epochs=1", "eval.beam_size=2", "checkpoint_every=0"])
    Trainer(cfg, converted, out).train()
    return out


def test_training_validates_and_keeps_best(trained_run, tb_scalars):
    assert (trained_run / "best.pt").is_file() and (trained_run / "last.pt").is_file()
    scalars = tb_scalars(trained_run)
    assert sorted(scalars["val/CIDEr"]) == [4, 8]  # 4 steps per epoch, validation after each epoch


def test_eval_writes_metrics_and_coco_results(trained_run, converted, tmp_path, capfast_cli):
    from pycocotools.coco import COCO

    from capfast.eval.metrics import write_reference_annotations
    from capfast.store.references import load_references

    result = capfast_cli("eval", "--checkpoint", trained_run / "best.pt", "--data", converted, "--split", "val",
                         "--beam", "2", "--json", tmp_path / "m.json", "--results", tmp_path / "r.json")
    assert result.code == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert METRICS <= set(metrics) and all(np.isfinite(v) for v in metrics.values())
    accuracies = {"accuracy/color", "accuracy/shape", "accuracy/position"}  # synth data carries attributes
    assert accuracies | {f"blind/{k}" for k in accuracies | METRICS} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in accuracies)
    assert "blind" in result.stdout and "accuracy/color" in result.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == 12  # every validation image exactly once
    write_reference_annotations(load_references(converted / "refs_val.json"), tmp_path / "refs.json")
    coco = COCO(str(tmp_path / "refs.json"))
    loaded = coco.loadRes(str(tmp_path / "r.json"))
    assert sorted(loaded.getImgIds()) == sorted(coco.getImgIds())


def _odd_images(folder: Path) -> list[Path]:
    rgb = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    paths = {"a.png": Image.fromarray(rgb), "gray.jpg": Image.fromarray(rgb[..., 0], "L"),
             "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "rgba.png": Image.fromarray(rgb).convert("RGBA")}
    for name, image in paths.items():
        image.save(folder / name)
    return [folder / name for name in paths]


def test_caption_any_image_mode(trained_run, tmp_path, capfast_cli):
    files = _odd_images(tmp_path)
    result = capfast_cli("caption", "--checkpoint", trained_run / "best.pt", "--json", "--beam", "2", *files)
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(f) for f in files]
    for line in lines:
        assert line["caption"].strip(), line  # an empty caption is not a caption
        assert line["caption"] == line["caption"].strip() and "<" not in line["caption"], line  # no special tokens


def test_caption_a_folder_captions_its_images_in_name_order(trained_run, tmp_path, capfast_cli):
    files = sorted(_odd_images(tmp_path))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    result = capfast_cli("caption", "--checkpoint", trained_run / "best.pt", "--beam", "1", tmp_path, empty)
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(f) for f in files]
    assert f"note: {tmp_path}: skipping 3 entries that are not image files (empty/, notes.txt, sub/)" in result.stderr
    assert f"error: {empty} holds no image files" in result.stderr and result.code == 1


def test_caption_reports_unreadable_files_and_goes_on(trained_run, tmp_path, capfast_cli):
    good = _odd_images(tmp_path)[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    result = capfast_cli("caption", "--checkpoint", trained_run / "best.pt", bad, good, tmp_path / "missing.jpg")
    assert result.code != 0
    assert "broken.jpg" in result.stderr and "missing.jpg" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.startswith(str(good))


def test_eval_bad_inputs(trained_run, converted, tmp_path, capfast_cli):
    assert_clean_error(capfast_cli("eval", "--checkpoint", tmp_path / "nope.pt", "--data", converted, "--split", "val"),
                       "checkpoint not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((trained_run / "best.pt").read_bytes()[:1000])
    assert_clean_error(capfast_cli("eval", "--checkpoint", corrupt, "--data", converted, "--split", "val"),
                       "cannot read checkpoint")
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    vocab = json.loads((data / "vocab.json").read_text())
    vocab["words"].append("zebra-that-was-never-seen")
    (data / "vocab.json").write_text(json.dumps(vocab))
    assert_clean_error(capfast_cli("eval", "--checkpoint", trained_run / "best.pt", "--data", data, "--split", "val"),
                       "different vocabulary")
    assert_clean_error(capfast_cli("caption", "--checkpoint", corrupt, tmp_path / "x.jpg"), "cannot read checkpoint")
    assert_clean_error(capfast_cli("eval", "--checkpoint", trained_run / "best.pt", "--data", data / "val.beton"),
                       f"--data {data} --split val")
    assert_clean_error(capfast_cli("eval", "--checkpoint", trained_run / "best.pt", "--data", data, "--split", "tset"),
                       "tset.beton not found", "holds: train, val")


def test_eval_without_references_refuses_before_reading_the_split(trained_run, converted, tmp_path, capfast_cli):
    """No refs_val.json: refused before the split is decoded. The beton is junk too, and the loader's error about
    it (which a check after decoding would meet first) does not come."""
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    (data / "refs_val.json").unlink()
    (data / "val.beton").write_bytes(b"not a beton at all" * 10)
    result = capfast_cli("eval", "--checkpoint", trained_run / "best.pt", "--data", data, "--split", "val")
    assert_clean_error(result, "capfast eval needs the val split's reference captions", "refs_val.json not found")


@pytest.mark.parametrize("args, message", [
    (("eval", "--data", "d", "--beam", "0"), "--beam must be an integer >= 1, got 0"),
    (("eval", "--data", "d", "--max-len", "0"), "--max-len must be an integer >= 1, got 0"),
    (("eval", "--data", "d", "--batch-size", "0"), "--batch-size must be an integer >= 1, got 0"),
    (("caption", "--beam", "0", "x.jpg"), "--beam must be an integer >= 1, got 0"),
    (("caption", "--max-len", "-3", "x.jpg"), "--max-len must be an integer >= 1, got -3"),
])
def test_generation_flags_refuse_what_the_recipe_s_keys_refuse(tmp_path, capfast_cli, args, message):
    """--beam and --max-len are eval.beam_size and eval.max_len's rules (GenerationOptions), --batch-size is
    data.batch_size's (LoaderOptions): refused while parsing, before the checkpoint is even looked for."""
    assert_clean_error(capfast_cli(*args, "--checkpoint", tmp_path / "nope.pt"), message)


def test_eval_under_torchrun_scores_every_image_once(trained_run, converted, tmp_path, free_port):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
           "--master_addr=127.0.0.1", "-m", "capfast", "eval", "--checkpoint", trained_run / "best.pt",
           "--data", converted, "--split", "val", "--beam", "1", "--no-meteor", "--results", tmp_path / "r.json"]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    ids = sorted(r["image_id"] for r in results)
    assert len(ids) == 12 and len(set(ids)) == 12
    assert proc.stdout.count("CIDEr") == 1  # only rank 0 prints


def test_eval_needs_no_meta_json(trained_run, converted, tmp_path, capfast_cli):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("val.beton", "refs_val.json", "vocab.json"):  # what eval reads; no meta.json, no train split
        shutil.copy(converted / name, data / name)
    result = capfast_cli("eval", "--checkpoint", trained_run / "best.pt", "--data", data, "--split", "val",
                         "--beam", "1", "--no-blind", "--no-meteor", "--json", tmp_path / "m.json")
    assert result.code == 0, result.stderr
    metrics = set(json.loads((tmp_path / "m.json").read_text()))
    assert METRICS <= metrics and "METEOR" not in metrics  # --no-meteor: no Java start even where java is present


def test_max_images_counts_over_all_ranks(trained_run, converted):
    """Under DDP each rank scores its share: N ranks together score max_images, not N x max_images."""
    from capfast.data import LoaderOptions
    from capfast.data.loader import CaptionLoader, build_loader
    from capfast.data.order import Shard
    from capfast.eval.evaluate import generate_split
    from capfast.models.generate import GenerationOptions
    from capfast.models.load import load_model

    model, record = load_model(trained_run / "best.pt")
    vocab = record.vocab
    settings = build_loader(converted / "val.beton", LoaderOptions(batch_size=4, image_size=32), train=False,
                            normalization=model.normalization).settings
    ids = []
    for rank in (0, 1):
        rank_loader = CaptionLoader(converted / "val.beton", settings, Shard(rank, 2))
        results = generate_split(model, rank_loader, vocab, generation=GenerationOptions(beam_size=1),
                                 max_images=5).results
        assert len(results) == (3, 2)[rank]
        ids += list(results)
    assert len(set(ids)) == 5


@pytest.mark.parametrize("caption, expected", [
    ("a small red circle on the left of a white background", (True, True, True)),
    ("a red and blue gradient background with a red circle to the left", (True, True, True)),
    ("a red circle on the right", (True, True, False)),
    ("a red square", (True, False, False)),
    ("a blue circle on the left and a red circle on the right", (False, False, False)),  # one shape too many
    ("a white background", (False, False, False)),
])
def test_attribute_accuracy_of_one_shape(caption, expected):
    from capfast.eval.attributes import ATTRIBUTES, image_correct, mentions

    truth = [{"color": "red", "shape": "circle", "position": "left"}]
    assert tuple(image_correct(mentions(caption), truth)[a] for a in ATTRIBUTES) == expected


def test_attribute_accuracy_of_two_shapes_binds_positions_to_shapes():
    from capfast.eval.attributes import attribute_accuracy

    truth = {1: [{"color": "red", "shape": "circle", "position": "left"},
                 {"color": "blue", "shape": "square", "position": "right"}]}
    right = "a blue square on the right and a red circle to the left"
    swapped = "a red circle on the right and a blue square on the left"
    assert attribute_accuracy({1: right}, truth) == {"accuracy/color": 1, "accuracy/shape": 1, "accuracy/position": 1}
    assert attribute_accuracy({1: swapped}, truth) == {"accuracy/color": 1, "accuracy/shape": 1,
                                                       "accuracy/position": 0}
