import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
import torchvision

from capfast.errors import CapfastError
from capfast.models import ModelConfig, build_captioner

VOCAB = 40
PAD = 0
DECODERS = ["transformer", "lstm"]


def tiny_config(decoder="transformer", **kw) -> ModelConfig:
    tiny = dict(encoder="resnet18", d_model=32, n_layers=2, n_heads=4, lstm_hidden=32, attn_dim=32, embed_dim=32,
                max_positions=16)
    return ModelConfig(decoder=decoder, **{**tiny, **kw})


def tiny_model(decoder="transformer", seed=0, **kw):
    torch.manual_seed(seed)
    return build_captioner(tiny_config(decoder, **kw), VOCAB)


def images(b=2, size=64, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def captions(b=2, k=3, length=8, seed=2):
    """[b, k, length] rows of bos, words, eos, pad."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.full((b, k, length), PAD)
    for i in range(b):
        for j in range(k):
            n = int(torch.randint(1, length - 1, (1,), generator=g))
            caps[i, j, 0] = 1
            caps[i, j, 1:n + 1] = torch.randint(3, VOCAB, (n,), generator=g)
            caps[i, j, n + 1] = 2
    return caps


def caption_loss(logits, caps):
    return F.cross_entropy(logits.flatten(0, -2).float(), caps[..., 1:].flatten(), ignore_index=PAD)


@pytest.mark.parametrize("decoder", DECODERS)
def test_forward_shape(decoder):
    logits = tiny_model(decoder)(images(), captions(b=2, k=3, length=8))
    assert logits.shape == (2, 3, 7, VOCAB)


@pytest.mark.parametrize("decoder", DECODERS)
def test_encode_gives_one_feature_per_32_pixels(decoder):
    assert tiny_model(decoder).encode(images(b=2, size=64)).shape == (2, 4, 32)


@pytest.mark.parametrize("decoder", DECODERS)
def test_all_pad_rows_are_finite(decoder):
    model = tiny_model(decoder)
    caps = captions(b=2, k=3)
    caps[1, 1:] = PAD  # image 1 has a single caption
    logits = model(images(), caps)
    loss = caption_loss(logits, caps)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("decoder", DECODERS)
def test_each_caption_sees_only_its_own_image_and_prefix(decoder):
    model = tiny_model(decoder, dropout=0.0).eval()
    imgs, caps = images(b=2), captions(b=2, k=2)
    logits = model(imgs, caps)
    alone = model(imgs[1:], caps[1:, 1:])
    torch.testing.assert_close(logits[1:, 1:], alone, atol=1e-5, rtol=1e-4)
    changed = caps.clone()
    changed[0, 0, 5:] = 7
    torch.testing.assert_close(model(imgs, changed)[0, 0, :4], logits[0, 0, :4], atol=1e-5, rtol=1e-4)


def test_frozen_encoder_gets_no_grads_and_keeps_bn_stats():
    model = tiny_model(batchnorm="batch")  # a trainable trunk updates its statistics (the default freezes them)
    model.set_encoder_trainable(False)
    model.train()
    bn = model.encoder.trunk.bn1
    stats = bn.running_mean.clone()
    caption_loss(model(images(), captions()), captions()).backward()
    assert not bn.training and torch.equal(bn.running_mean, stats)
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.trunk.parameters())
    assert model.encoder.proj.weight.grad is not None and model.decoder.tok_emb.weight.grad is not None

    model.set_encoder_trainable(True)
    assert bn.training and all(p.requires_grad for p in model.encoder.trunk.parameters())
    model(images(), captions())
    assert not torch.equal(bn.running_mean, stats)


def save_resnet18_state(path, seed=3):
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("old_style", [False, True])
def test_local_encoder_weights_load(tmp_path, old_style):
    state = save_resnet18_state(tmp_path / "r18.pt")
    if old_style:  # torchvision's original files lack BatchNorm's num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        torch.save(state, tmp_path / "r18.pt")
    model = build_captioner(tiny_config(encoder_weights=str(tmp_path / "r18.pt")), VOCAB)
    assert torch.equal(model.encoder.trunk.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.encoder.trunk.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_mismatched_encoder_weights_raise(tmp_path):
    state = save_resnet18_state(tmp_path / "r18.pt")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "wrong_shape.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_text("not a torch file")
    for name in ["wrong_shape.pt", "missing.pt", "garbage.pt", "absent.pt"]:
        with pytest.raises(CapfastError) as info:
            build_captioner(tiny_config(encoder_weights=str(tmp_path / name)), VOCAB)
        assert "\n" not in str(info.value)


def test_resnet50_weights_do_not_fit_resnet18(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(CapfastError, match="do not fit resnet18"):
        build_captioner(tiny_config(encoder_weights=str(tmp_path / "r50.pt")), VOCAB)


@pytest.mark.parametrize("field,value", [("encoder", "vgg16"), ("decoder", "gru")])
def test_unknown_architecture_raises(field, value):
    with pytest.raises(CapfastError, match="unknown"):
        build_captioner(tiny_config(**{field: value}), VOCAB)


def test_config_round_trips_through_json_and_skips_weights_when_asked(tmp_path):
    cfg = tiny_config(encoder_weights=str(tmp_path / "gone.pt"))
    rebuilt = ModelConfig(**json.loads(json.dumps(asdict(cfg))))
    assert rebuilt == cfg
    assert build_captioner(rebuilt, VOCAB, load_encoder_weights=False) is not None
    with pytest.raises(CapfastError, match="unknown config key .model.layers."):
        ModelConfig.from_dict({**asdict(cfg), "layers": 3})


def test_state_dict_round_trip_with_tied_weights():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    other.load_state_dict(model.state_dict())
    assert other.decoder.head.weight is other.decoder.tok_emb.weight
    torch.testing.assert_close(other.eval()(images(), captions()), model.eval()(images(), captions()))


@pytest.mark.parametrize("decoder", DECODERS)
def test_channels_last_matches_contiguous(decoder):
    model = tiny_model(decoder).eval()
    imgs, caps = images(), captions()
    expected = model(imgs, caps)
    model = model.to(memory_format=torch.channels_last)
    got = model(imgs.contiguous(memory_format=torch.channels_last), caps)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_bf16_autocast_forward_backward(decoder):
    model = tiny_model(decoder)
    caps = captions()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images(), caps)
        loss = caption_loss(logits, caps)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("decoder", DECODERS)
def test_tiny_model_overfits_fixed_captions(decoder):
    model = tiny_model(decoder, dropout=0.0)
    model.set_encoder_trainable(False)
    imgs, caps = images(b=2, size=32), captions(b=2, k=2, length=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(50):
        loss = caption_loss(model(imgs, caps), caps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


@pytest.mark.slow
def test_compiled_forward_backward_has_no_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without slow codegen. One
    ResNet stage (encoder_depth=1): tracing takes time per operation, and the later stages repeat the same code."""
    for decoder in DECODERS:
        model = tiny_model(decoder, n_layers=1, encoder_depth=1)
        model.set_encoder_trainable(decoder == "transformer")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        caps = captions()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = caption_loss(compiled(images(size=32), caps), caps)
        loss.backward()
        assert torch.isfinite(loss)


def test_random_encoder_weights_can_be_asked_for_by_name():
    from capfast.models import ModelConfig, build_captioner

    model = build_captioner(ModelConfig(encoder="resnet18", encoder_weights="random", d_model=16, n_layers=1,
                                        n_heads=2), vocab_size=10)
    assert model.encoder.trunk[0].weight.abs().sum() > 0


def test_frozen_batchnorm_trains_the_encoder_without_batch_statistics():
    """model.batchnorm=frozen: a trainable trunk whose BatchNorm uses its stored statistics, so each image's
    features do not depend on the rest of its batch (what makes N ranks x B/N equal 1 x B)."""
    for mode in ("frozen", "batch"):
        model = tiny_model(batchnorm=mode).train()
        model.set_encoder_trainable(True)
        bn = model.encoder.trunk.bn1
        before = bn.running_mean.clone()
        batch = images(b=3)
        alone = model.encode(batch[:1])
        model(batch, captions(b=3)).sum().backward()
        assert model.encoder.trunk.conv1.weight.grad is not None and bn.weight.grad is not None
        if mode == "frozen":
            assert not bn.training and torch.equal(bn.running_mean, before)
            torch.testing.assert_close(model.encode(batch)[:1], alone)
        else:
            assert bn.training and not torch.equal(bn.running_mean, before)


def test_fewer_encoder_stages_give_a_finer_grid_and_load_the_kept_stages(tmp_path):
    """encoder_depth=2 stops after layer2: an 8x8 grid of 128 channels on 64² images; a full ResNet weights file
    loads into the stages kept."""
    state = save_resnet18_state(tmp_path / "r18.pt")
    model = build_captioner(tiny_config(encoder_depth=2, encoder_weights=str(tmp_path / "r18.pt")), VOCAB)
    assert list(model.encoder.trunk._modules)[-1] == "layer2"
    assert torch.equal(model.encoder.trunk.layer2[1].bn2.running_var, state["layer2.1.bn2.running_var"])
    assert model.encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 8 * 8, 32)
    assert build_captioner(tiny_config(), VOCAB).encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 2 * 2, 32)
