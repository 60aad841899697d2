"""AdamW with decoupled weight decay groups and a warmup + cosine learning-rate factor."""

import math

import torch
from torch import nn

from capfast.errors import CapfastError
from capfast.models import is_trunk_parameter
from capfast.models.checkpoint import check_finite
from capfast.train.config import OptimConfig

# Modules whose parameters are never decayed: decay would pull embeddings and normalization scales toward 0.
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """The encoder's trunk gets `encoder_lr`, everything else (the encoder's projection and norm, the decoder)
    `lr` (capfast.models.captioner.TRUNK_PREFIX); biases and the parameters of embeddings and norms get no weight decay.
    Fused (CUDA and CPU): one kernel per step, which also skips a step on the device when its `found_inf` says so."""
    no_decay_ids = no_decay_parameter_ids(model)
    groups = {}
    for name, param in model.named_parameters():
        key = (is_trunk_parameter(name), id(param) in no_decay_ids)
        groups.setdefault(key, []).append(param)
    param_groups = [{"params": params, "encoder": is_trunk, "decay": not no_decay,
                     "lr": cfg.encoder_lr if is_trunk else cfg.lr}
                    for (is_trunk, no_decay), params in sorted(groups.items())]
    # The decoder's groups come first so that param_groups[0]["lr"] is the headline learning rate.
    param_groups.sort(key=lambda g: g["encoder"])
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    apply_settings(optimizer, cfg)
    return optimizer


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """Biases and other vectors, and every parameter of an embedding or norm module (tied ones included:
    a head tied to the token embedding is that embedding)."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def apply_settings(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Sets each group's base lr, weight decay and betas from `cfg`: at build time, and after a resumed run
    loaded the checkpoint's optimizer state (which carries the old values) so that changed values apply."""
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.encoder_lr if group["encoder"] else cfg.lr
        group["weight_decay"] = cfg.weight_decay if group["decay"] else 0.0
        group["betas"] = tuple(cfg.betas)


def restore_optimizer(optimizer: torch.optim.Optimizer, path, saved: dict, cfg: OptimConfig) -> None:
    """A checkpoint's moments and step counts (`saved`, read from `path`), with this run's lr, weight decay and
    betas; non-finite moments are refused."""
    for index, values in saved["state"].items():
        check_finite(path, {f"optimizer state {index}.{k}": v for k, v in values.items()}, "refusing to resume")
    flags = [(group["encoder"], group["decay"]) for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except ValueError:
        raise CapfastError(f"cannot resume from {path}: its optimizer state does not fit this model's "
                           "parameter groups (written by another capfast version?)") from None
    for group, (encoder, decay) in zip(optimizer.param_groups, flags):
        group["encoder"], group["decay"] = encoder, decay
    apply_settings(optimizer, cfg)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
