"""AdamW with decoupled weight decay groups and a warmup + cosine learning-rate factor."""

import math

import torch

from capfast.train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """Encoder parameters get `encoder_lr`; norms, biases and embeddings get no weight decay."""
    groups = {}
    for name, param in model.named_parameters():
        is_encoder = name.startswith("encoder.")
        no_decay = param.ndim < 2 or "embed" in name or "norm" in name
        key = (is_encoder, no_decay)
        groups.setdefault(key, []).append(param)
    param_groups = []
    for (is_encoder, no_decay), params in sorted(groups.items()):
        lr = cfg.encoder_lr if is_encoder else cfg.lr
        param_groups.append({"params": params, "lr": lr, "base_lr": lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    # The decoder's group comes first so that param_groups[0]["lr"] is the headline learning rate.
    param_groups.sort(key=lambda g: g["base_lr"] != cfg.lr)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


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
