"""Image transforms in torch, shared by the CPU and GPU loaders and by `capfast caption`.

Crops are sampled on the CPU from a torch.Generator the caller seeds per batch, so both devices crop the same
boxes. Resizing is PyTorch's antialiased bilinear (F.interpolate(antialias=True), PIL's filter) everywhere: per
image on the CPU (uint8 fast path), and on CUDA as two batched matmuls with the same filter weights, so a batch
costs a handful of kernels instead of a few per image. No horizontal flip: captions say "left" and "right".
"""

import functools
import math

import torch
import torch.nn.functional as F

from capfast.common.normalization import IMAGENET, Normalization
from capfast.errors import CapfastError

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop's


# ---- device helpers ----------------------------------------------------------------------------------

def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not wait for the stream: a plain .to() of pageable memory synchronizes it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _column(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)


@functools.cache
def constants(device: torch.device, normalization: Normalization) -> dict:
    """mean * 255 and 1 / (std * 255) as [1, 3, 1, 1] float32, once per device and normalization."""
    return {"mean": _column(normalization.mean, device) * 255,
            "inv_std": 1 / (_column(normalization.std, device) * 255)}


@functools.cache
def gray_weights(device: torch.device) -> torch.Tensor:
    return _column(GRAY_WEIGHTS, device)


# ---- sampling (CPU, seeded) --------------------------------------------------------------------------

def _uniform(generator, shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def random_crop_boxes(sizes: torch.Tensor, scale, ratio, generator) -> torch.Tensor:
    """torchvision RandomResizedCrop boxes for a batch: int64 [B, 4] = (top, left, height, width).

    `sizes` is int64 [B, 2] = (height, width) of each image. Always draws the same amount of randomness.
    """
    n = sizes.shape[0]
    img_h, img_w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = img_h * img_w * _uniform(generator, (n, CROP_ATTEMPTS), *scale)
    aspect = torch.exp(_uniform(generator, (n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= img_w) & (h <= img_h)
    first = fits.long().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1, keepdim=True)
    fallback_h, fallback_w = _fallback_crop(img_h, img_w, ratio)
    h = torch.where(found, h.gather(1, first), fallback_h)
    w = torch.where(found, w.gather(1, first), fallback_w)
    u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.where(found, (u[:, 0:1] * (img_h - h + 1)).floor(), ((img_h - h) / 2).floor())
    left = torch.where(found, (u[:, 1:2] * (img_w - w + 1)).floor(), ((img_w - w) / 2).floor())
    return torch.cat([top, left, h, w], dim=1).long()


def _fallback_crop(img_h, img_w, ratio):
    """torchvision's central crop when no attempt fits: the whole image, clipped to the ratio range."""
    in_ratio = img_w / img_h
    lo, hi = min(ratio), max(ratio)
    h = torch.where(in_ratio < lo, (img_w / lo).round(), img_h)
    w = torch.where(in_ratio > hi, (img_h * hi).round(), img_w)
    return h, w


def full_boxes(sizes: torch.Tensor) -> torch.Tensor:
    """Boxes covering each whole image (the evaluation transform)."""
    zeros = torch.zeros_like(sizes)
    return torch.cat([zeros, sizes], dim=1).long()


def jitter_factors(n: int, strength: float, generator) -> torch.Tensor:
    """float32 [n, 3] brightness, contrast and saturation factors, each uniform in [1 - s, 1 + s], >= 0."""
    return _uniform(generator, (n, 3), max(0.0, 1 - strength), 1 + strength).float()


# ---- resizing -----------------------------------------------------------------------------------------

def resize_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, out=None) -> torch.Tensor:
    """Crops `boxes` out of uint8 [B, 3, H, W] `images` (padded; any strides) and resizes each to size x size.

    Returns [B, 3, size, size] with integer values 0..255: uint8 on the CPU (written into `out` if given),
    float32 on CUDA.
    """
    if images.device.type == "cpu":
        return resize_per_image(images, boxes, size, out)
    return resize_batched(images, boxes, size)


def resize_per_image(images, boxes: torch.Tensor, size: int, out=None) -> torch.Tensor:
    """One F.interpolate per image: uint8 output on the CPU (its vectorized uint8 kernel), float on CUDA."""
    on_cpu = images[0].device.type == "cpu"
    if out is None:
        out = torch.empty((len(images), 3, size, size), dtype=torch.uint8 if on_cpu else torch.float32,
                          device=images[0].device, memory_format=torch.channels_last)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[i][:, top:top + h, left:left + w].unsqueeze(0)
        crop = crop.contiguous(memory_format=torch.channels_last) if on_cpu else crop.float()
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out if on_cpu else out.round_().clamp_(0, 255)


def resize_batched(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The same antialiased bilinear resize as resize_per_image, as out = Wy @ image @ Wx^T for the batch."""
    boxes = to_device(boxes, images.device)
    rows = aa_weights(boxes[:, 0], boxes[:, 2], images.shape[2], size)
    cols = aa_weights(boxes[:, 1], boxes[:, 3], images.shape[3], size)
    with torch.autocast(images.device.type, enabled=False):
        x = torch.matmul(rows.unsqueeze(1), images.float())
        x = torch.matmul(x, cols.transpose(1, 2).unsqueeze(1))
    return x.round_().clamp_(0, 255)


def aa_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """float32 [B, out_size, in_size]: PyTorch's antialiased bilinear weights (aten UpSampleKernel, aa) for
    resizing pixels [start, start + length) of each row of the batch to out_size, zero elsewhere."""
    device = start.device
    length = length.double()[:, None]
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)  # bilinear: half-width 1, stretched when downscaling
    inv_scale = 1.0 / support
    center = scale * (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5)
    first = (center - support + 0.5).trunc().clamp(min=0)
    last = torch.minimum((center + support + 0.5).trunc(), length)
    pos = torch.arange(in_size, dtype=torch.float64, device=device) - start.double()[:, None]
    pos = pos[:, None, :]
    weights = (1 - ((pos - center[..., None] + 0.5) * inv_scale[..., None]).abs()).clamp(min=0)
    weights = weights * ((pos >= first[..., None]) & (pos < last[..., None]))
    return (weights / weights.sum(dim=-1, keepdim=True)).float()


# ---- colour and normalization ------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * gray_weights(x.device)).sum(dim=1, keepdim=True)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness, _contrast, _saturation (in that order) on float32 [B, 3, H, W] in 0..255."""
    f = to_device(factors, x.device).view(-1, 3, 1, 1)
    x = (x * f[:, 0:1]).clamp_(0, 255)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1:2] + mean).clamp_(0, 255)
    gray = _gray(x)
    return ((x - gray) * f[:, 2:3] + gray).clamp_(0, 255)


def normalize(x: torch.Tensor, dtype: torch.dtype, normalization: Normalization) -> torch.Tensor:
    """(x / 255 - mean) / std, channels_last, in `dtype`."""
    from capfast.data import lut

    if x.device.type == "cpu" and x.dtype == torch.uint8 and lut.supported(dtype):
        return lut.normalize_uint8(x, lut.normalization_table(normalization.mean, normalization.std, dtype))
    c = constants(x.device, normalization)
    # NCHW while computing: a channels_last broadcast over C has an inner loop of 3 and is several times slower
    y = torch.sub(x.contiguous(), c["mean"]).mul_(c["inv_std"])
    return y.to(dtype=dtype, memory_format=torch.channels_last)


# ---- batches of decoded images -----------------------------------------------------------------------

def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [B, 3, H_max, W_max] holding each [3, h, w] image in its top-left corner."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    out = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=images[0].device)
    for i, image in enumerate(images):
        out[i, :, :image.shape[1], :image.shape[2]] = image
    return out


def image_sizes(images) -> torch.Tensor:
    return torch.tensor([[image.shape[-2], image.shape[-1]] for image in images], dtype=torch.int64)


def preprocess_images(images, image_size: int, device="cpu", dtype=torch.float32,
                      normalization: Normalization = IMAGENET) -> torch.Tensor:
    """The evaluation transform for uint8 images ([B, 3, H, W] or a list of [3, h, w]): each whole image resized
    to image_size x image_size, normalized with the encoder's `normalization`, channels_last, `dtype`, on `device`."""
    images = list(images)
    if not images:
        raise CapfastError("no images to preprocess")
    for image in images:
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise CapfastError(f"images must be uint8 [3, H, W] RGB, got {image.dtype} {list(image.shape)}")
    device = torch.device(device)
    images = [image.to(device) for image in images]
    resized = resize_per_image(images, full_boxes(image_sizes(images)), image_size)
    return normalize(resized, dtype, normalization)
