"""Image encoder: a backbone (models/backbones.py) whose feature sequence [B, S, width] becomes the decoder's
memory [B, S, d_model] through a projection and a LayerNorm (the encoder's head). A frozen trunk's features can
be computed once (`capfast features`) and read instead of images: set_reads_trunk_features(True)."""

import hashlib

import torch
from torch import nn

from capfast.errors import CapfastError
from capfast.models.backbones import build_backbone

BATCHNORM_MODES = ("frozen", "batch")


class Encoder(nn.Module):
    """images [B, 3, H, W] (normalized with `self.normalization`, any memory format) -> memory [B, S, d_model].
    A ResNet with all 4 stages gives S = H/32 * W/32 (stride 2 ** (stages + 1) with fewer), a ViT one token
    per patch (+ the class token when kept)."""

    def __init__(self, name: str, d_model: int, weights=None, batchnorm: str = "frozen", depth: int = 0,
                 image_size: int | None = None, class_token: str = "drop"):
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise CapfastError(f"unknown batchnorm mode {batchnorm!r}; choose one of {', '.join(BATCHNORM_MODES)}")
        self.batchnorm = batchnorm
        if weights in ("", "random"):  # TOML has no null: a recipe says "random" to override a default
            weights = None
        # Frozen BatchNorm of a random ResNet never normalizes (its statistics are the init's 0 and 1): starting
        # every residual block as an identity keeps activations in scale without it (as Fixup/SkipInit do).
        backbone = build_backbone(name, weights, depth, image_size, class_token,
                                  zero_init_residual=batchnorm == "frozen" and weights is None)
        self.trunk = backbone.trunk
        self.normalization, self.native_size = backbone.normalization, backbone.native_size
        self.proj = nn.Linear(backbone.width, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.trainable = True
        self.reads_trunk_features = False  # forward() then takes the trunk's output [B, S, width], not images

    def set_trainable(self, flag: bool) -> None:
        """Frozen = trunk parameters get no gradients and the trunk runs in eval mode (BatchNorm statistics
        fixed, no dropout). Trainable: parameters train; BatchNorm normalizes with batch statistics only in
        "batch" mode. LayerNorm (ViT, Swin, ConvNeXt) has no statistics: frozen or not, it needs no mode."""
        self.trainable = bool(flag)
        for p in self.trunk.parameters():
            p.requires_grad_(self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.trunk.eval()
        elif self.batchnorm == "frozen":
            for module in self.trunk.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # normalize with the stored running statistics; they are never updated
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W], or the trunk's features [B, S, width] when it reads those -> memory [B, S, d_model]"""
        features = inputs if self.reads_trunk_features else self.trunk_features(inputs)
        return self.norm(self.proj(features))

    def trunk_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> the trunk's feature sequence [B, S, width] (what `capfast features` stores)."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.trunk(images)


def trunk_fingerprint(trunk: torch.nn.Module) -> str:
    """sha256 of a trunk's parameters and buffers (names, dtypes, shapes, values): which weights made a feature
    cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(trunk.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
