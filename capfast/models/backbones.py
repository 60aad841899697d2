"""Image backbones by name, each as a trunk that maps images to a sequence of feature vectors [B, S, width].

torchvision's ResNet, ViT, Swin and ConvNeXt are built in; any timm ViT ("timm:" + its name, e.g. OpenAI CLIP's
"timm:vit_base_patch16_clip_224.openai" or "timm:vit_base_patch16_siglip_224") comes with the optional extra
`capfast[timm]`. timm is the one library chosen for CLIP-style weights: a single create_model API covers OpenAI
CLIP, OpenCLIP and SigLIP checkpoints and each model declares its own normalization constants and input size,
where open_clip covers CLIP only and bundles a text tower a captioner does not use.

Each backbone declares its input normalization, its native input size and its feature width. `depth` keeps the
first stages (ResNet, Swin, ConvNeXt: 4) or blocks (ViT: 12 for B, 24 for L); 0 keeps all.
"""

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from capfast.common.normalization import IMAGENET, Normalization
from capfast.errors import CapfastError

TIMM_PREFIX = "timm:"
RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
VITS = ("vit_b_16", "vit_b_32", "vit_l_16")
SWINS = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")
CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
TORCHVISION = (*RESNETS, *VITS, *SWINS, *CONVNEXTS)
RESNET_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
STAGES = 4  # residual stages of a ResNet, and stages of a Swin or ConvNeXt
PRETRAINED = ("pretrained", "torchvision", "timm")  # encoder_weights values that ask for the library's weights
CLASS_TOKEN = ("drop", "keep")


def check_name(name: str) -> str | None:
    """An option() check: None for a known encoder name, else what it must be."""
    if name in TORCHVISION or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        return None
    return f"one of {', '.join(TORCHVISION)} or timm:<a timm ViT name>"


def fixed_input_size(name: str) -> bool:
    """A ViT's position embeddings are made for one input size; convolutions and Swin's windows take any."""
    return name in VITS or name.startswith(TIMM_PREFIX)


@dataclass
class Backbone:
    trunk: nn.Module  # images [B, 3, H, W] -> [B, S, width] through `tokens`
    width: int
    normalization: Normalization
    native_size: int


def build_backbone(name: str, weights, depth: int, image_size: int | None, class_token: str,
                   zero_init_residual: bool) -> Backbone:
    """`weights`: None (random init), one of PRETRAINED (the library's; may download) or a state_dict path."""
    problem = check_name(name)
    if problem:
        raise CapfastError(f"unknown encoder {name!r}; choose {problem}")
    if class_token not in CLASS_TOKEN:
        raise CapfastError(f"class_token must be one of {', '.join(CLASS_TOKEN)}, got {class_token!r}")
    if name.startswith(TIMM_PREFIX):
        return timm_vit(name[len(TIMM_PREFIX):], weights, depth, image_size, class_token)
    if name in RESNETS:
        return resnet(name, weights, depth, zero_init_residual)
    if name in VITS:
        return torchvision_vit(name, weights, depth, image_size, class_token)
    return staged(name, weights, depth)


# ---- weights ---------------------------------------------------------------------------------------------

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


def describe_mismatch(expected: dict, given: dict) -> str:
    """'' when `given` fits `expected`, else a short account of the differences."""
    # BatchNorm fills in num_batches_tracked itself; older torchvision files lack it.
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    problems = (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong_shape))
    return ", ".join(f"{len(keys)} tensors {label} (first: {keys[0]})" for label, keys in problems if keys)


HEADS = ("fc.", "heads.", "head.", "classifier.")  # torchvision's classifier heads: a weights file may lack them


def load_weights(module: nn.Module, state: dict, source, name: str) -> None:
    """`module` takes `state` (read from `source`), with or without a classifier head."""
    state = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(HEADS)}
    mismatch = describe_mismatch(expected, state)
    if mismatch:
        raise CapfastError(f"encoder weights {source} do not fit {name}: {mismatch}")
    module.load_state_dict(state, strict=False)


def library_state(name: str) -> dict:
    """torchvision's pretrained weights of `name` (downloaded, or from torch's cache)."""
    try:
        return torchvision.models.get_model(name, weights="DEFAULT").state_dict()
    except Exception as e:  # network and cache errors come in many kinds
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CapfastError(f"cannot get torchvision's pretrained {name} weights: {reason}") from None


def torchvision_model(name: str, weights, **kwargs) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights is not None:
        state = library_state(name) if weights in PRETRAINED else load_state_dict_file(weights)
        load_weights(model, state, weights, name)
    return model


def checked_depth(name: str, depth: int, available: int, unit: str) -> int:
    if not 0 <= depth <= available:
        raise CapfastError(f"{name} has {available} {unit}: encoder_depth must be 0 (all) or 1..{available}, "
                           f"got {depth}")
    return depth or available


# ---- ResNet ----------------------------------------------------------------------------------------------

class ResNetTrunk(nn.Sequential):
    """A ResNet without avgpool/fc, cut after `stages` residual stages; torchvision's parameter names."""

    def forward(self, images):
        features = super().forward(images)  # [B, C, h, w]
        # flatten+transpose is a view; for channels_last features it is already laid out as [B, h*w, C].
        return features.flatten(2).transpose(1, 2)


def resnet(name: str, weights, depth: int, zero_init_residual: bool) -> Backbone:
    stages = checked_depth(name, depth, STAGES, "stages")
    model = torchvision.models.get_model(name, weights=None, zero_init_residual=zero_init_residual)
    if weights in PRETRAINED:
        load_weights(model, library_state(name), weights, name)
    kept = RESNET_LAYERS[:len(RESNET_LAYERS) - STAGES + stages]
    trunk = ResNetTrunk(OrderedDict((layer, getattr(model, layer)) for layer in kept))
    if weights is not None and weights not in PRETRAINED:
        # a file of the whole ResNet, or of a trunk cut as this one: the later stages are not used
        state = {k: v for k, v in load_state_dict_file(weights).items() if k.startswith(tuple(f"{m}." for m in kept))}
        load_weights(trunk, state, weights, name)
    return Backbone(trunk, RESNETS[name] >> (STAGES - stages), IMAGENET, 224)


# ---- ViT (torchvision) -----------------------------------------------------------------------------------

class VitTrunk(nn.Module):
    """torchvision's VisionTransformer without its head: patch tokens (+ the class token, if kept)."""

    def __init__(self, vit: nn.Module, blocks: int, keep_class_token: bool):
        super().__init__()
        vit.encoder.layers = vit.encoder.layers[:blocks]
        vit.heads = nn.Identity()
        self.vit, self.keep_class_token = vit, keep_class_token

    def forward(self, images):
        x = self.vit._process_input(images)  # [B, N, D] patch embeddings
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.vit.encoder(x)
        return x if self.keep_class_token else x[:, 1:]


def torchvision_vit(name: str, weights, depth: int, image_size: int | None, class_token: str) -> Backbone:
    native = 224
    size = image_size or native
    patch = int(name.rsplit("_", 1)[1])
    if size % patch:
        raise CapfastError(f"{name} takes images in multiples of {patch} pixels; data.image_size is {size}")
    vit = torchvision.models.get_model(name, weights=None, image_size=size)
    if weights is not None:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = library_state(name) if weights in PRETRAINED else load_state_dict_file(weights)
        embedding = state.get("encoder.pos_embedding")
        if embedding is not None and embedding.shape != vit.encoder.pos_embedding.shape:
            state = interpolate_embeddings(size, patch, state)  # weights for another grid (224²: 14 x 14)
        load_weights(vit, state, weights, name)
    blocks = checked_depth(name, depth, len(vit.encoder.layers), "blocks")
    return Backbone(VitTrunk(vit, blocks, class_token == "keep"), vit.hidden_dim, IMAGENET, native)


# ---- Swin, ConvNeXt (torchvision) ------------------------------------------------------------------------

class StagedTrunk(nn.Module):
    """The `features` of a torchvision Swin or ConvNeXt (a stem or patch embedding, then stage, downsampling,
    stage, ...) cut after a stage; Swin's final norm is kept when every stage is."""

    def __init__(self, model: nn.Module, stages: int, channels_last_output: bool):
        super().__init__()
        self.features = model.features[:2 * stages]
        self.norm = model.norm if channels_last_output and stages == STAGES else nn.Identity()
        self.channels_last_output = channels_last_output

    def forward(self, images):
        x = self.features(images)
        if self.channels_last_output:  # Swin: [B, h, w, C]
            return self.norm(x).flatten(1, 2)
        return x.flatten(2).transpose(1, 2)  # ConvNeXt: [B, C, h, w]


def staged(name: str, weights, depth: int) -> Backbone:
    stages = checked_depth(name, depth, STAGES, "stages")
    trunk = StagedTrunk(torchvision_model(name, weights), stages, channels_last_output=name in SWINS)
    norms = [m for m in trunk.features.modules() if isinstance(m, nn.LayerNorm)]  # the last is a block's, C wide
    return Backbone(trunk, norms[-1].normalized_shape[0], IMAGENET, 224)


# ---- timm ViTs (CLIP, OpenCLIP, SigLIP, ...) -------------------------------------------------------------

class TimmVitTrunk(nn.Module):
    def __init__(self, model: nn.Module, keep_prefix_tokens: bool):
        super().__init__()
        self.model, self.keep_prefix_tokens = model, keep_prefix_tokens

    def forward(self, images):
        x = self.model.forward_features(images)  # [B, prefix + N, D], after the final norm
        return x if self.keep_prefix_tokens else x[:, self.model.num_prefix_tokens:]


def timm_vit(name: str, weights, depth: int, image_size: int | None, class_token: str) -> Backbone:
    try:
        import timm
    except ImportError:
        raise CapfastError(f"encoder timm:{name} needs timm: pip install 'capfast[timm]'") from None
    options = {"pretrained": weights is not None, "num_classes": 0}
    if weights is not None and weights not in PRETRAINED:
        if not Path(weights).is_file():
            raise CapfastError(f"encoder weights not found: {weights}")
        options["pretrained_cfg_overlay"] = {"file": str(weights)}
    if image_size:
        options["img_size"] = image_size
    try:
        model = timm.create_model(name, **options)
    except Exception as e:  # unknown names, downloads, files and sizes fail in many kinds
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CapfastError(f"cannot build timm encoder {name}: {reason[:200]}") from None
    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise CapfastError(f"timm encoder {name} is not a ViT (capfast takes timm's vision transformers)")
    model.blocks = model.blocks[:checked_depth(f"timm:{name}", depth, len(model.blocks), "blocks")]
    config = model.pretrained_cfg
    normalization = Normalization(tuple(config.get("mean", IMAGENET.mean)), tuple(config.get("std", IMAGENET.std)))
    native = int(config.get("input_size", (3, 224, 224))[-1])
    return Backbone(TimmVitTrunk(model, class_token == "keep"), int(model.num_features), normalization, native)
