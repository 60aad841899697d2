"""Optimizer parameter groups: which parameters decay, which learning rate each gets."""

import pytest
from torch import nn

from capfast.models import ModelConfig, build_captioner
from capfast.train.config import OptimConfig
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
            assert lr_of[id(param)] == (1e-4 if module_name.startswith("encoder") else 1e-3), f"{module_name}.{name}"
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    assert embeddings and all(decay_of[id(w)] == 0.0 for w in embeddings)
    assert any(decay == 0.05 for decay in decay_of.values())
