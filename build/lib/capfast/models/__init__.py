"""Captioning models: a ResNet encoder and a Transformer or LSTM (Show, Attend and Tell) decoder."""

from capfast.models.captioner import Captioner, DecodeState, ModelConfig, build_captioner

__all__ = ["Captioner", "DecodeState", "ModelConfig", "build_captioner"]
