"""Image encoder: a torchvision ResNet trunk (no avgpool/fc) whose feature map becomes a sequence [B, h*w, d_model]."""

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from capfast.errors import CapfastError

ENCODER_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


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


def torchvision_resnet(name: str, weights) -> nn.Module:
    """`weights`: None (random init), "torchvision" (download torchvision's pretrained ones) or a state_dict path."""
    if weights == "torchvision":
        try:
            return torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as e:  # network and cache errors come in many kinds
            reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise CapfastError(f"cannot get torchvision's pretrained {name} weights: {reason}") from None
    return torchvision.models.get_model(name, weights=None)


def describe_mismatch(expected: dict, given: dict) -> str:
    """'' when `given` fits `expected`, else a short account of the differences."""
    # BatchNorm fills in num_batches_tracked itself; older torchvision files lack it.
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    problems = (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong_shape))
    return ", ".join(f"{len(keys)} tensors {label} (first: {keys[0]})" for label, keys in problems if keys)


def load_trunk_weights(trunk: nn.Module, path, name: str) -> None:
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("fc.")}
    mismatch = describe_mismatch(trunk.state_dict(), state)
    if mismatch:
        raise CapfastError(f"encoder weights {path} do not fit {name}: {mismatch}")
    trunk.load_state_dict(state)


class Encoder(nn.Module):
    """images [B, 3, H, W] (normalized, any memory format) -> memory [B, S = H/32 * W/32, d_model]."""

    def __init__(self, name: str, d_model: int, weights=None):
        super().__init__()
        if name not in ENCODER_CHANNELS:
            raise CapfastError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_CHANNELS)}")
        if weights in ("", "random"):  # TOML has no null: a recipe says "random" to override a default
            weights = None
        resnet = torchvision_resnet(name, weights)
        # An OrderedDict keeps torchvision's parameter names, so its state_dict files load as they are.
        self.trunk = nn.Sequential(OrderedDict((layer, getattr(resnet, layer)) for layer in TRUNK_LAYERS))
        if weights not in (None, "torchvision"):
            load_trunk_weights(self.trunk, weights, name)
        self.proj = nn.Linear(ENCODER_CHANNELS[name], d_model)
        self.norm = nn.LayerNorm(d_model)
        self.trainable = True

    def set_trainable(self, flag: bool) -> None:
        """Frozen = trunk parameters get no gradients and its BatchNorm statistics stay fixed (eval mode)."""
        self.trainable = bool(flag)
        for p in self.trunk.parameters():
            p.requires_grad_(self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.trunk.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            features = self.trunk(images)  # [B, C, h, w]
        # flatten+transpose is a view; for channels_last features it is already laid out as [B, h*w, C].
        return self.norm(self.proj(features.flatten(2).transpose(1, 2)))
