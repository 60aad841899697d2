"""Encoders by name (torchvision ResNet/ViT/Swin/ConvNeXt, timm CLIP-style ViTs), their normalization end to end,
and `capfast export`: all with random weights on the CPU (nothing downloads)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from capfast.common.normalization import IMAGENET, Normalization
from capfast.errors import CapfastError
from capfast.models import ModelConfig, build_captioner
from capfast.models.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
CLIP = "timm:vit_base_patch16_clip_224.openai"  # OpenAI's CLIP ViT-B/16, the CLIP recipe's encoder
# A CLIP-style timm ViT with CLIP's constants at an eighth of the width (TinyCLIP): ~5x cheaper to build, for the
# tests that train one and load it again and again
SMALL_CLIP = "timm:vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
CLIP_NORMALIZATION = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TINY_RUN = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.dropout=0.0", "model.encoder_depth=1",
            "data.image_size=32", "data.batch_size=8", "data.workers=1", "eval.every_epochs=0", "precision=fp32",
            "checkpoint_every=0", "encoder_trainable_from_epoch=0"]


@pytest.mark.parametrize("name,depth,tokens,width", [
    ("resnet18", 2, 8 * 8, 128),
    ("vit_b_16", 1, 4 * 4, 768),
    ("swin_t", 1, 16 * 16, 96),
    ("convnext_tiny", 2, 8 * 8, 192),
])
def test_each_torchvision_family_gives_a_token_sequence(name, depth, tokens, width):
    encoder = Encoder(name, d_model=24, depth=depth, image_size=64)
    assert encoder.proj.in_features == width
    memory = encoder(torch.rand(2, 3, 64, 64))
    assert memory.shape == (2, tokens, 24) and torch.isfinite(memory).all()
    assert encoder.normalization == IMAGENET


def test_a_vit_keeps_its_class_token_when_asked():
    drop = Encoder("vit_b_16", d_model=8, depth=1, image_size=32)
    keep = Encoder("vit_b_16", d_model=8, depth=1, image_size=32, class_token="keep")
    assert drop(torch.rand(1, 3, 32, 32)).shape[1] == 4 and keep(torch.rand(1, 3, 32, 32)).shape[1] == 5


@pytest.mark.parametrize("name,depth,image_size,message", [
    ("vit_b_16", 13, 32, "vit_b_16 has 12 blocks: encoder_depth must be 0 (all) or 1..12, got 13"),
    ("resnet18", 5, 32, "resnet18 has 4 stages: encoder_depth must be 0 (all) or 1..4, got 5"),
    ("vit_b_16", 1, 40, "vit_b_16 takes images in multiples of 16 pixels; data.image_size is 40"),
    ("vgg16", 0, 32, "unknown encoder 'vgg16'"),
])
def test_bad_encoder_settings_are_one_line(name, depth, image_size, message):
    with pytest.raises(CapfastError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        Encoder(name, d_model=8, depth=depth, image_size=image_size)
    assert "\n" not in str(info.value)


def test_a_frozen_vit_trunk_gets_no_gradients_and_runs_without_dropout():
    encoder = Encoder("vit_b_16", d_model=8, depth=1, image_size=32)
    encoder.set_trainable(False)
    encoder.train()
    assert not encoder.trunk.training and encoder.proj.training
    encoder(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in encoder.trunk.parameters()) and encoder.proj.weight.grad is not None
    encoder.set_trainable(True)
    assert encoder.trunk.training


def test_local_weights_files_load_into_a_vit_and_a_convnext(tmp_path):
    import torchvision

    for name, depth in (("vit_b_16", 1), ("convnext_tiny", 1)):
        kwargs = {"image_size": 32} if name.startswith("vit") else {}
        full = torchvision.models.get_model(name, weights=None, **kwargs)
        torch.save(full.state_dict(), tmp_path / f"{name}.pt")  # the whole model, classifier head included
        encoder = Encoder(name, d_model=8, depth=depth, weights=str(tmp_path / f"{name}.pt"), image_size=32)
        loaded = dict(encoder.trunk.named_parameters())
        first = next(iter(full.state_dict()))
        assert any(torch.equal(full.state_dict()[first], p) for p in loaded.values()), name
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CapfastError, match="do not fit vit_b_16"):
        Encoder("vit_b_16", d_model=8, depth=1, weights=str(tmp_path / "other.pt"), image_size=32)


# ---- timm (CLIP-style) -----------------------------------------------------------------------------------

def test_a_clip_encoder_declares_clip_s_normalization_and_loads_a_local_file(tmp_path):
    pytest.importorskip("timm")
    encoder = Encoder(CLIP, d_model=8, depth=1, image_size=32)
    assert encoder.normalization == CLIP_NORMALIZATION and encoder.native_size == 224
    assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 4, 8)  # the class token dropped
    torch.save(encoder.trunk.model.state_dict(), tmp_path / "clip.pt")
    again = Encoder(CLIP, d_model=8, depth=1, weights=str(tmp_path / "clip.pt"), image_size=32)
    assert torch.equal(again.trunk.model.patch_embed.proj.weight, encoder.trunk.model.patch_embed.proj.weight)


def test_the_loader_normalizes_with_the_clip_encoder_s_constants_and_the_checkpoint_keeps_them(converted, tmp_path):
    """What the trainer's loader gives equals the evaluation transform with CLIP's mean/std, not ImageNet's."""
    pytest.importorskip("timm")
    from torchvision import io as tio

    from capfast.data import preprocess_images
    from capfast.models.load import load_model
    from capfast.store.beton import BetonContents
    from capfast.train.config import load_config
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [f"model.encoder=\"{SMALL_CLIP}\"", *TINY_RUN, "epochs=1"])
    trainer = Trainer(cfg, converted, tmp_path / "run")
    loader = trainer._make_loader("val", train=False)
    assert loader.settings.normalization == CLIP_NORMALIZATION
    batch = next(iter(loader.epoch(0)))  # the first records, in file order
    contents = BetonContents(converted / "val.beton")
    images = [tio.decode_jpeg(torch.frombuffer(bytearray(contents.image_bytes(i)), dtype=torch.uint8))
              for i in range(len(batch.image_ids))]
    clip = preprocess_images(images, image_size=32, normalization=CLIP_NORMALIZATION)
    imagenet = preprocess_images(images, image_size=32, normalization=IMAGENET)
    level = 1 / 255 / min(CLIP_NORMALIZATION.std)
    assert (batch.images - clip).abs().max() <= 8 * level  # the CPU stage's fast IDCT: a few levels
    assert (batch.images - imagenet).abs().max() > 30 * level
    trainer.train()
    model, record = load_model(tmp_path / "run" / "last.pt")
    assert record.normalization == CLIP_NORMALIZATION == model.normalization


# ---- a ViT end to end, and export ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_run(converted, tmp_path_factory):
    from capfast.train.config import load_config
    from capfast.train.trainer import Trainer

    out = tmp_path_factory.mktemp("vit")
    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", ["model.encoder=vit_b_16", *TINY_RUN, "epochs=1"])
    Trainer(cfg, converted, out).train()
    return out


@pytest.mark.parametrize("encoder", ["vit_b_16", SMALL_CLIP])
def test_a_vit_trains_resumes_evaluates_and_captions(encoder, vit_run, converted, tmp_path, capfast_cli, synth_coco):
    run = tmp_path / "run"
    if encoder == "vit_b_16":
        shutil.copytree(vit_run, run)
    else:
        pytest.importorskip("timm")
        first = capfast_cli("train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                            "--out", run, f"model.encoder=\"{encoder}\"", *TINY_RUN, "epochs=1")
        assert first.code == 0, first.stderr
    resumed = capfast_cli("train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                          "--out", run, "--resume", f"model.encoder=\"{encoder}\"", *TINY_RUN, "epochs=2")
    assert resumed.code == 0, resumed.stderr
    from capfast.models.checkpoint import load

    assert load(run / "last.pt")["train"]["step"] == 2 * 32 // 8
    scored = capfast_cli("eval", "--checkpoint", run / "last.pt", "--data", converted, "--beam", "1",
                         "--no-meteor", "--no-blind", "--json", tmp_path / "m.json")
    assert scored.code == 0, scored.stderr
    assert "CIDEr" in json.loads((tmp_path / "m.json").read_text())
    image = sorted((synth_coco / "images" / "val").glob("*.jpg"))[0]
    captioned = capfast_cli("caption", "--checkpoint", run / "last.pt", "--beam", "1", image)
    assert captioned.code == 0 and captioned.stdout.startswith(str(image)), captioned.stderr


def test_export_gives_the_checkpoint_s_captions_and_unpickles_nothing(vit_run, converted, tmp_path, capfast_cli,
                                                                     synth_coco, monkeypatch):
    exported = tmp_path / "model"
    result = capfast_cli("export", vit_run / "last.pt", exported)
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in exported.iterdir()} == {0o666 & ~umask}  # all shared alike
    config = json.loads((exported / "config.json").read_text())
    assert config["model_config"]["encoder"] == "vit_b_16" and config["normalization"] == IMAGENET.to_dict()
    images = sorted((synth_coco / "images" / "val").glob("*.jpg"))[:4]
    from_checkpoint = capfast_cli("caption", "--checkpoint", vit_run / "last.pt", "--beam", "2", *images)
    from_folder = capfast_cli("caption", "--checkpoint", exported, "--beam", "2", *images)
    assert from_folder.code == 0 and from_folder.stdout == from_checkpoint.stdout
    import pickle

    from capfast.models.load import load_model

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)  # nothing may unpickle while the folder is read
    model, _ = load_model(exported)
    assert model.image_size == 32


def test_init_from_takes_an_exported_folder(vit_run, converted, tmp_path, capfast_cli):
    from capfast.models.checkpoint import load

    capfast_cli("export", vit_run / "last.pt", tmp_path / "model")
    result = capfast_cli("train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "run", f"init_from=\"{tmp_path / 'model'}\"", *TINY_RUN, "epochs=1",
                         "optim.lr=1e-12", "optim.encoder_lr=1e-12", "encoder_trainable_from_epoch=-1")
    assert result.code == 0, result.stderr
    assert load(tmp_path / "run" / "last.pt")["model"]["model_config"]["encoder"] == "vit_b_16"


def test_a_damaged_export_folder_is_one_line(vit_run, tmp_path, capfast_cli, synth_coco):
    exported = tmp_path / "model"
    capfast_cli("export", vit_run / "last.pt", exported)
    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    image = sorted((synth_coco / "images" / "val").glob("*.jpg"))[0]
    result = capfast_cli("caption", "--checkpoint", exported, image)
    assert result.code != 0 and result.stderr.count("\n") == 1 and "model.safetensors" in result.stderr
    (exported / "config.json").write_text("{}")
    result = capfast_cli("caption", "--checkpoint", exported, image)
    assert "is not a model folder written by `capfast export`" in result.stderr


def test_model_config_refuses_an_unknown_encoder_in_one_line():
    with pytest.raises(CapfastError, match="model.encoder must be one of resnet18"):
        ModelConfig.from_dict({"encoder": "vgg16"})
    assert build_captioner(ModelConfig(encoder="vit_b_16", encoder_depth=1, d_model=16, n_heads=2, n_layers=1),
                           10).image_size == 224  # the native size when none is given


def test_init_from_a_vit_at_another_image_size_is_one_line(vit_run, converted, tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "run", f"init_from=\"{vit_run / 'last.pt'}\"", *TINY_RUN,
                         "data.image_size=48")
    assert result.code != 0 and result.stderr.count("\n") == 1
    assert "was trained at data.image_size=32; its vit_b_16 encoder needs the same here (got 48)" in result.stderr
