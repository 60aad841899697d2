"""Captioning models (an image encoder, a Transformer or LSTM decoder), caption generation and checkpoints."""

from capfast.models.captioner import Captioner, GenerationState, ModelConfig, build_captioner, is_trunk_parameter

__all__ = ["Captioner", "GenerationState", "ModelConfig", "build_captioner", "is_trunk_parameter"]
