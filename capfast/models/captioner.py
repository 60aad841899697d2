"""Captioner = image encoder + caption decoder; its config; and the state of step-by-step generation."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from capfast.common.options import build, option
from capfast.errors import CapfastError
from capfast.models.backbones import CLASS_TOKEN, check_name
from capfast.models.encoder import BATCHNORM_MODES, Encoder
from capfast.models.lstm import LSTMDecoder
from capfast.models.transformer import TransformerDecoder
from capfast.store.vocab import Vocab

DECODERS = ("transformer", "lstm")


@dataclass
class ModelConfig:
    """Saved in checkpoints as asdict(cfg), rebuilt with ModelConfig.from_dict: every field JSON-serializable."""

    # torchvision's resnet18..101, vit_b_16, vit_l_16, swin_t.., convnext_tiny..; "timm:<name>" for a timm ViT
    # (CLIP, SigLIP: pip install 'capfast[timm]'). Each brings its input normalization and native input size.
    encoder: str = option("resnet50", check=check_name)
    # None/"random": random init | "pretrained" (or "torchvision"/"timm"): the library's, downloaded | a local
    # state_dict path (for timm: a file timm's loader reads)
    encoder_weights: str | None = option(None)
    # BatchNorm of a trainable encoder. "frozen": eval mode, the running statistics in the weights normalize
    # (the affine scale/shift still train), so N ranks x B/N, accumulation and 1 x B train alike.
    # "batch": each rank's micro-batch statistics (plain BatchNorm; ranks and accumulation no longer match).
    batchnorm: str = option("frozen", choices=BATCHNORM_MODES)
    # stages (ResNet, Swin, ConvNeXt: 1..4) or blocks (ViT: 1..12, 24 for L) kept; 0: all. A ResNet with fewer
    # stages has a finer feature grid (stride 2 ** (stages + 1)), fewer FLOPs and weights
    encoder_depth: int = option(0, min=0)
    class_token: str = option("drop", choices=CLASS_TOKEN)  # a ViT's class (prefix) tokens in the memory or not
    decoder: str = option("transformer", choices=DECODERS)
    d_model: int = option(512, min=1)  # image feature size (both decoders) and transformer width
    n_layers: int = option(3, min=1)
    n_heads: int = option(8, min=1)  # must divide d_model
    ffn_mult: int = option(4, min=1)
    dropout: float = option(0.1, min=0, below=1)
    tie_weights: bool = option(True)
    max_positions: int = option(64, min=2)
    lstm_hidden: int = option(512, min=1)
    attn_dim: int = option(512, min=1)
    embed_dim: int = option(512, min=1)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return build(cls, d, prefix="model.")


@dataclass
class GenerationState:
    """What `Captioner.step` carries between steps. Every tensor has the generation rows (images x beams) first."""

    tensors: dict = field(default_factory=dict)
    position: int = 0
    use_cache: bool = True

    def index_select(self, rows: torch.Tensor) -> "GenerationState":
        """Keep/reorder/duplicate generation rows, e.g. to follow the surviving beams."""
        tensors = {k: v.index_select(0, rows) for k, v in self.tensors.items()}
        return GenerationState(tensors, self.position, self.use_cache)


# The encoder's trunk (the ResNet) is the only part that freezes (encoder_trainable_from_epoch) and trains at
# optim.encoder_lr; the projection and LayerNorm after it adapt its features to the decoder and train with it.
TRUNK_PREFIX = "encoder.trunk."


def is_trunk_parameter(name: str) -> bool:
    """Whether the Captioner parameter `name` belongs to the encoder's trunk (TRUNK_PREFIX)."""
    return name.startswith(TRUNK_PREFIX)


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: Encoder, decoder: nn.Module, vocab_size: int, image_size: int):
        super().__init__()
        self.cfg, self.vocab_size, self.image_size = cfg, vocab_size, image_size
        self.pad_id, self.bos_id, self.eos_id = Vocab.pad_id, Vocab.bos_id, Vocab.eos_id  # the vocabulary's alone
        self.encoder, self.decoder = encoder, decoder

    @property
    def normalization(self):
        """What the loader and captioning must normalize images with: the encoder's."""
        return self.encoder.normalization

    def set_encoder_trainable(self, flag: bool) -> None:
        self.encoder.set_trainable(flag)

    def set_reads_trunk_features(self, flag: bool) -> None:
        """True: encode() and forward() take the trunk's cached features [B, S, width] where they took images."""
        self.encoder.reads_trunk_features = bool(flag)

    def trunk_id(self):
        """What names this model's trunk for a feature cache (capfast.store.feature_cache.TrunkId)."""
        from capfast.models.encoder import trunk_fingerprint
        from capfast.store.feature_cache import TrunkId

        return TrunkId(encoder=self.cfg.encoder, weights=trunk_fingerprint(self.encoder.trunk),
                       image_size=self.image_size, normalization=self.normalization.to_dict(),
                       encoder_depth=self.cfg.encoder_depth, class_token=self.cfg.class_token)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (or the trunk's cached features [B, S, width]: set_reads_trunk_features) ->
        memory [B, S, D]"""
        return self.encoder(images)

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: images [B, 3, H, W], captions [B, K, L] -> logits [B, K, L-1, V] for captions[..., 1:].

        Rows that are all padding (images with fewer than K captions) give finite logits; the loss ignores them.
        """
        return self.decoder(captions[..., :-1], self.encode(images))

    def init_state(self, memory: torch.Tensor, use_cache: bool = True) -> GenerationState:
        """Generation state for rows of `memory` [N, S, D]; the first `step` gets bos.

        use_cache=False re-runs the decoder on the whole prefix at every step (slow; a reference for tests).
        """
        if use_cache:
            return GenerationState(self.decoder.init_cache(memory))
        prefix = torch.empty(memory.shape[0], 0, dtype=torch.long, device=memory.device)
        return GenerationState({"memory": memory, "prefix": prefix}, use_cache=False)

    def step(self, tokens: torch.Tensor, state: GenerationState):
        """tokens [N] (the latest of each row) -> (log-probabilities [N, V] float32, next state)."""
        if state.use_cache:
            logits, tensors = self.decoder.step(tokens, state.tensors, state.position)
        else:
            prefix = torch.cat([state.tensors["prefix"], tokens.unsqueeze(1)], dim=1)
            memory = state.tensors["memory"]
            logits = self.decoder(prefix.unsqueeze(1), memory)[:, 0, -1]
            tensors = {"memory": memory, "prefix": prefix}
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return logprobs, GenerationState(tensors, state.position + 1, state.use_cache)


def build_decoder(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    if cfg.decoder == "transformer":
        return TransformerDecoder(vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_mult, cfg.dropout,
                                  cfg.max_positions, cfg.tie_weights)
    if cfg.decoder == "lstm":
        return LSTMDecoder(vocab_size, cfg.d_model, cfg.embed_dim, cfg.lstm_hidden, cfg.attn_dim, cfg.dropout,
                           cfg.tie_weights)
    raise CapfastError(f"unknown decoder {cfg.decoder!r}; choose one of {', '.join(DECODERS)}")


def build_captioner(cfg: ModelConfig, vocab_size: int, *, image_size: int | None = None,
                    load_encoder_weights: bool = True) -> Captioner:
    """A fresh captioner for image_size² inputs (default: the encoder's native size; a ViT's position embeddings
    are made for it). load_encoder_weights=False skips cfg.encoder_weights (random trunk): use it when a
    checkpoint's state_dict is loaded next, so captioning needs neither the weights file nor a download."""
    decoder = build_decoder(cfg, vocab_size)
    encoder = Encoder(cfg.encoder, cfg.d_model, cfg.encoder_weights if load_encoder_weights else None,
                      batchnorm=cfg.batchnorm, depth=cfg.encoder_depth, image_size=image_size,
                      class_token=cfg.class_token)
    return Captioner(cfg, encoder, decoder, vocab_size, image_size or encoder.native_size)
