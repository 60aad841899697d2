"""A trained captioner as one record: its config, vocabulary, input size, input normalization and weights.

`capfast train` checkpoints hold it as their "model" entry (state_dict()), `capfast export` writes its
description() as config.json beside model.safetensors, and capfast.models.checkpoint.read_model reads it back
from either. Everything needed to rebuild the model and preprocess its images is here, so captioning needs no
data directory and no training config.
"""

import dataclasses
from dataclasses import dataclass

import torch

from capfast.common.normalization import Normalization
from capfast.errors import CapfastError
from capfast.models.captioner import Captioner, ModelConfig, build_captioner
from capfast.store.vocab import Vocab

DESCRIPTION_KEYS = ("model_config", "vocab", "image_size", "normalization")
# Special token ids were model options before they came from the vocabulary alone (checkpoint version 2, export
# version 1): such records still load when they agree with the vocabulary.
FORMER_SPECIAL_IDS = {"pad_id": Vocab.pad_id, "bos_id": Vocab.bos_id, "eos_id": Vocab.eos_id}


@dataclass
class ModelRecord:
    config: ModelConfig
    vocab: Vocab
    image_size: int
    normalization: Normalization
    weights: dict  # the Captioner's state_dict

    @classmethod
    def of(cls, model: Captioner, vocab: Vocab) -> "ModelRecord":
        return cls(model.cfg, vocab, model.image_size, model.normalization, model.state_dict())

    def description(self) -> dict:
        """Everything but the weights, as plain JSON values."""
        return {"model_config": dataclasses.asdict(self.config), "vocab": list(self.vocab.words),
                "image_size": self.image_size, "normalization": self.normalization.to_dict()}

    @classmethod
    def described(cls, values: dict, weights: dict, source) -> "ModelRecord":
        """The record of description() `values` with `weights`; a one-line error naming `source` if it is not one."""
        missing = [key for key in DESCRIPTION_KEYS if key not in values]
        if missing:
            raise CapfastError(f"{source} is not a capfast model record (no {', '.join(missing)})")
        config = ModelConfig.from_dict(_without_former_special_ids(values["model_config"], source))
        return cls(config, Vocab(tuple(values["vocab"])), int(values["image_size"]),
                   Normalization.from_dict(values["normalization"]), weights)

    def state_dict(self) -> dict:
        return {**self.description(), "weights": self.weights}

    @classmethod
    def from_state_dict(cls, values: dict, source) -> "ModelRecord":
        return cls.described(values, values.get("weights"), source)

    def build(self, source, device="cpu") -> Captioner:
        """The captioner in eval mode on `device`, its weights checked finite and loaded."""
        model = self.architecture(source)
        check_finite(source, self.weights, "refusing to load it")
        model.load_state_dict(self.weights)
        return model.to(device).eval()

    def architecture(self, source) -> Captioner:
        """The captioner this record describes, with untrained weights (none are downloaded)."""
        model = build_captioner(self.config, vocab_size=len(self.vocab), image_size=self.image_size,
                                load_encoder_weights=False)
        if model.normalization != self.normalization:
            raise CapfastError(f"{source} was trained with input normalization {self.normalization.to_dict()}, but "
                               f"encoder {self.config.encoder} now declares {model.normalization.to_dict()} "
                               f"(another timm or torchvision version?)")
        return model


def check_finite(source, tensors: dict, action: str) -> None:
    """CapfastError naming the first floating tensor of `tensors` (a state_dict) with a NaN or an infinity."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CapfastError(f"{source}: {name} holds NaN or infinite values; {action}")


def _without_former_special_ids(model_config: dict, source) -> dict:
    config = dict(model_config)
    for key, vocab_id in FORMER_SPECIAL_IDS.items():
        if key in config and config.pop(key) != vocab_id:
            raise CapfastError(f"{source} sets model.{key}={model_config[key]}, but the vocabulary's is {vocab_id}: "
                               f"it was trained with token ids that disagree with its vocabulary; retrain it")
    return config
