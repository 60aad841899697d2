"""Normalization of uint8 images on the CPU as one table lookup per value.

A uint8 channel has 256 possible values, so (x - mean) / std in any output dtype is a 3 x 256 table computed by
torch (bit-identical to computing it per pixel). One numba pass over the pixels then replaces torch's
promote-subtract-multiply-relayout chain, which dominated the CPU loader's time.
"""

import functools

import torch

# numba has no bfloat16: tables and outputs are moved as integers of the same width
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@functools.cache
def _gather():
    import numba

    @numba.njit(nogil=True)
    def gather(pixels, table, out):
        for i in range(pixels.shape[0]):
            for c in range(3):
                out[i, c] = table[c, pixels[i, c]]

    return gather


@functools.cache
def normalization_table(mean, std, dtype: torch.dtype) -> torch.Tensor:
    """[3, 256] of ((v - mean*255) * (1 / (std*255))) in `dtype`, computed as augment.normalize does."""
    values = torch.arange(256, dtype=torch.float32).view(1, 256)
    shift = torch.tensor(mean, dtype=torch.float32).view(3, 1) * 255
    scale = 1 / (torch.tensor(std, dtype=torch.float32).view(3, 1) * 255)
    return ((values - shift) * scale).to(dtype)


def normalize_uint8(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] CPU images -> table.dtype [B, 3, H, W], channels_last."""
    pixels = images.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, 3)
    out = torch.empty(images.shape, dtype=table.dtype, memory_format=torch.channels_last)
    bits = _BITS[table.dtype]
    flat_out = out.permute(0, 2, 3, 1).view(-1, 3).view(bits)
    _gather()(pixels.numpy(), table.view(bits).numpy(), flat_out.numpy())
    return out


def supported(dtype: torch.dtype) -> bool:
    return dtype in _BITS

