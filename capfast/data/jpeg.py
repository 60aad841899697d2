"""Batched JPEG decoding with nvJPEG (or libjpeg-turbo on CPU), through TorchCodec when installed, else torchvision.

torchvision >= 0.29 deprecates its decoders in favour of TorchCodec >= 0.16; older torchvision (0.20+) is the only
batched CUDA decoder available where TorchCodec is not installed.
"""

import functools
import warnings

import torch


@functools.cache
def _backend():
    try:
        from torchcodec.decoders import decode_jpeg
        return "torchcodec", decode_jpeg
    except ImportError:
        from torchvision.io import decode_jpeg
        return "torchvision", decode_jpeg


def decode_jpegs(encoded: list[torch.Tensor], device) -> list[torch.Tensor]:
    """[3, h, w] uint8 RGB tensors on `device` from 1-D uint8 CPU tensors of JPEG bytes.

    On CUDA call this with a dedicated stream current and nothing queued on it (stream.synchronize() first):
    nvJPEG's hardware decoder writes into the freshly allocated outputs when the call is made, not in stream
    order, so memory the caching allocator recycles on the current stream must not still be read by queued work
    (torchvision #9606, TorchCodec #1634).
    """
    name, decode = _backend()
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Dd]eprecat.*")
        if name == "torchcodec":
            try:
                return list(decode(encoded, device=device))
            except (TypeError, ValueError, RuntimeError):  # a TorchCodec whose decode_jpeg takes one image at a time
                return [decode(data, device=device) for data in encoded]
        from torchvision.io import ImageReadMode
        return decode(encoded, mode=ImageReadMode.RGB, device=device)


def first_undecodable(jpegs: list[torch.Tensor]) -> int | None:
    """The position of the first of `jpegs` (uint8 tensors) that torchvision cannot decode on the CPU, after a
    batched decode failed: the batch's error names no image. None when the CPU decodes them all."""
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, data in enumerate(jpegs):
            try:
                decode_jpeg(data.cpu())
            except RuntimeError:
                return i
    return None
