"""Image encoder: a torchvision ResNet trunk (no avgpool/fc) whose feature map becomes a sequence [B, h*w, d_model]."""

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from capfast.errors import CapfastError

ENCODER_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
STAGES = 4  # a ResNet's residual stages, layer1..layer4; each after the first halves the feature grid
BATCHNORM_MODES = ("frozen", "batch")
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def stage_channels(name: str, stages: int) -> int:
    """Channels of the feature map after the first `stages` stages: the last stage's, halved per stage dropped."""
    return ENCODER_CHANNELS[name] >> (STAGES - stages)


def load_state_dict_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CapfastError(f"encoder weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CapfastError(f"cannot read encoder weights {path}: not a torch file ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CapfastError(f"encoder weights {path} are not a state_dict (a dict of tensors)")
    return state


def torchvision_resnet(name: str, weights, zero_init_residual: bool = False) -> nn.Module:
    """`weights`: None (random init), "torchvision" (download torchvision's pretrained ones) or a state_dict path.
    zero_init_residual: each residual block's last BatchNorm scale starts at 0, so blocks start as identities."""
    if weights == "torchvision":
        try:
            return torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as e:  # network and cache errors come in many kinds
            reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise CapfastError(f"cannot get torchvision's pretrained {name} weights: {reason}") from None
    return torchvision.models.get_model(name, weights=None, zero_init_residual=zero_init_residual)


def describe_mismatch(expected: dict, given: dict) -> str:
    """'' when `given` fits `expected`, else a short account of the differences."""
    # BatchNorm fills in num_batches_tracked itself; older torchvision files lack it.
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    problems = (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong_shape))
    return ", ".join(f"{len(keys)} tensors {label} (first: {keys[0]})" for label, keys in problems if keys)


def load_trunk_weights(trunk: nn.Module, path, name: str) -> None:
    kept = tuple(f"{layer}." for layer in trunk._modules)  # a trunk cut short of layer4 ignores the later stages
    state = {k: v for k, v in load_state_dict_file(path).items() if k.startswith(kept)}
    mismatch = describe_mismatch(trunk.state_dict(), state)
    if mismatch:
        raise CapfastError(f"encoder weights {path} do not fit {name}: {mismatch}")
    trunk.load_state_dict(state)


class Encoder(nn.Module):
    """images [B, 3, H, W] (normalized, any memory format) -> memory [B, S = H/s * W/s, d_model], s = 32 with all
    4 stages (2 ** (stages + 1) with fewer: 3 stages give a 4x4 grid on 64² images instead of 2x2)."""

    def __init__(self, name: str, d_model: int, weights=None, batchnorm: str = "frozen", stages: int = STAGES):
        super().__init__()
        if name not in ENCODER_CHANNELS:
            raise CapfastError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_CHANNELS)}")
        if batchnorm not in BATCHNORM_MODES:
            raise CapfastError(f"unknown batchnorm mode {batchnorm!r}; choose one of {', '.join(BATCHNORM_MODES)}")
        if not 1 <= stages <= STAGES:
            raise CapfastError(f"encoder stages must be 1..{STAGES}, got {stages}")
        self.batchnorm = batchnorm
        if weights in ("", "random"):  # TOML has no null: a recipe says "random" to override a default
            weights = None
        # Frozen BatchNorm of a random trunk never normalizes (its statistics are the init's 0 and 1): starting
        # every residual block as an identity keeps activations in scale without it (as Fixup/SkipInit do).
        resnet = torchvision_resnet(name, weights, zero_init_residual=batchnorm == "frozen" and weights is None)
        # An OrderedDict keeps torchvision's parameter names, so its state_dict files load as they are.
        self.trunk = nn.Sequential(OrderedDict((layer, getattr(resnet, layer))
                                              for layer in TRUNK_LAYERS[:len(TRUNK_LAYERS) - STAGES + stages]))
        if weights not in (None, "torchvision"):
            load_trunk_weights(self.trunk, weights, name)
        self.proj = nn.Linear(stage_channels(name, stages), d_model)
        self.norm = nn.LayerNorm(d_model)
        self.trainable = True

    def set_trainable(self, flag: bool) -> None:
        """Frozen = trunk parameters get no gradients and its BatchNorm statistics stay fixed (eval mode).
        Trainable: parameters train; BatchNorm normalizes with batch statistics only in "batch" mode."""
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            features = self.trunk(images)  # [B, C, h, w]
        # flatten+transpose is a view; for channels_last features it is already laid out as [B, h*w, C].
        return self.norm(self.proj(features.flatten(2).transpose(1, 2)))
