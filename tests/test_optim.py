"""Optimizer parameter groups: which parameters decay, which learning rate each gets; what a frozen trunk keeps."""

import pytest
import torch
from test_train import ROOT, SHALLOW
from torch import nn

from capfast.models import ModelConfig, build_captioner
from capfast.train.config import OptimConfig, load_config
from capfast.train.optim import build_optimizer


@pytest.mark.parametrize("decoder", ["transformer", "lstm"])
def test_embeddings_norms_and_biases_do_not_decay(decoder):
    cfg = ModelConfig(encoder="resnet18", decoder=decoder, d_model=32, n_layers=1, n_heads=2, lstm_hidden=32,
                      attn_dim=32, embed_dim=32, max_positions=16)
    model = build_captioner(cfg, vocab_size=40)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05, lr=1e-3, encoder_lr=1e-4))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay_of) == len(list(model.parameters()))  # every parameter in exactly one group
    # a tied head's weight is the token embedding: it is exempt through its embedding module
    owned_by_exempt = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm, nn.BatchNorm2d))
                       for p in m.parameters(recurse=False)}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            exempt = id(param) in owned_by_exempt or param.ndim < 2
            assert decay_of[id(param)] == (0.0 if exempt else 0.05), f"{module_name}.{name}"
            in_trunk = module_name.startswith("encoder.trunk")  # the encoder's proj and norm train with the decoder
            assert lr_of[id(param)] == (1e-4 if in_trunk else 1e-3), f"{module_name}.{name}"
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    assert embeddings and all(decay_of[id(w)] == 0.0 for w in embeddings)
    assert any(decay == 0.05 for decay in decay_of.values())


def test_a_frozen_trunk_keeps_its_weights_and_statistics_and_the_rest_moves_at_optim_lr(converted, tmp_path):
    """One real training step with encoder_trainable_from_epoch=-1: the trunk (weights and BatchNorm buffers) stays
    bit for bit; the encoder's projection and norm and the decoder move, at optim.lr (AdamW's first step moves a
    parameter by lr * g / (|g| + eps) per element, so the largest move in a tensor is lr), not at encoder_lr."""
    from capfast.train.trainer import Trainer

    lr, encoder_lr = 1e-3, 3e-2
    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [
        *SHALLOW, "encoder_trainable_from_epoch=-1", "max_steps=1", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        f"optim.lr={lr}", f"optim.encoder_lr={encoder_lr}"])
    trainer = Trainer(cfg, converted, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    trunk = [k for k in before if k.startswith("encoder.trunk.")]
    assert any("running_mean" in k for k in trunk)
    for name in trunk:
        assert torch.equal(before[name], after[name]), name
    moved = {k: (after[k] - before[k]).abs().max().item() for k in before if not k.startswith("encoder.trunk.")
             and after[k].is_floating_point()}
    for name in ("encoder.proj.weight", "encoder.norm.weight", "encoder.norm.bias", "decoder.tok_emb.weight"):
        assert moved[name] == pytest.approx(lr, rel=1e-3), name
