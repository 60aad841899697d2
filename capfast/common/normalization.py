"""An image encoder's input normalization, (x / 255 - mean) / std per channel: declared by the encoder, applied by
the loader and by captioning, carried in checkpoints and exported models."""

import math
from dataclasses import dataclass

from capfast.errors import CapfastError


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise CapfastError(f"normalization {name} must be 3 finite numbers (R, G, B), got {values!r}")
        if min(self.std) <= 0:
            raise CapfastError(f"normalization std must be > 0, got {self.std!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> "Normalization":
        if not isinstance(values, dict) or set(values) != {"mean", "std"}:
            raise CapfastError(f"normalization must be {{mean: [r, g, b], std: [r, g, b]}}, got {values!r}")
        return cls(tuple(values["mean"]), tuple(values["std"]))


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's pretrained models'
