"""Device and mixed-precision choice, with clear errors where a precision is not supported."""

import contextlib

import torch

from capfast.errors import CapfastError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise CapfastError(f"device must be {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise CapfastError("device=cuda was asked for but no CUDA GPU is available (use device=auto or cpu)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device):
    """The autocast dtype for `precision` (None for fp32)."""
    if precision not in DTYPES:
        raise CapfastError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise CapfastError("precision=fp16 needs a CUDA GPU; on the CPU use precision=bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CapfastError("this GPU does not support bf16; use precision=fp16 or fp32")
    return DTYPES[precision]


def autocast_context(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
