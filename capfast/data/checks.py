"""Checks of build_loader's arguments and of the beton it reads: one-line CapfastErrors for bad input."""

import os

import numpy as np
import torch

from capfast.data import order as orders
from capfast.errors import CapfastError
from capfast.store import schema

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_images(reader, beton: str) -> int:
    """Largest stored JPEG in bytes; CapfastError unless every image is stored as JPEG."""
    if reader.num_samples == 0:
        raise CapfastError(f"{beton} has no records")
    meta = reader.metadata[f"f{reader.field_names.index(schema.IMAGE)}"]
    if np.any(meta["mode"] != schema.JPG_MODE):
        raise CapfastError(f"{beton} stores raw (not JPEG) images; convert it again with capfast convert")
    table = reader.alloc_table
    by_ptr = np.argsort(table["ptr"])
    sizes = table["size"][by_ptr][np.searchsorted(table["ptr"][by_ptr], meta["data_ptr"])]
    return int(sizes.max())


def shard(distributed: bool) -> orders.Shard:
    if not distributed:
        return orders.Shard()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CapfastError("distributed=True needs torch.distributed initialized first (init_process_group)")
    return orders.Shard(dist.get_rank(), dist.get_world_size())


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise CapfastError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CapfastError(f"unknown device {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise CapfastError(f"the loader runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapfastError("device cuda requested but CUDA is not available")
    return device


def dtype(dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise CapfastError(f"image dtype must be one of float32, bfloat16, float16; got {dtype}")
    return dtype


def resolve_workers(num_workers) -> int:
    """ffcv threads: all cores this process may use (shared by the ranks of a node), clamped, since ffcv
    raises when asked for more threads than cores."""
    cores = len(os.sched_getaffinity(0))
    if num_workers is None:
        return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, min(int(num_workers), cores))


def seed(seed) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise CapfastError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def order(order: str) -> str:
    if order not in orders.ORDERS:
        raise CapfastError(f"unknown order {order!r}; choose one of {', '.join(orders.ORDERS)}")
    return order


def interval(values, what: str, upper) -> tuple:
    low, high = (float(v) for v in values)
    if not (0 < low <= high) or (upper is not None and high > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise CapfastError(f"{what} must be (low, high) with 0 < low <= high{bound}, got {tuple(values)}")
    return low, high


def prefetch(prefetch) -> int:
    if isinstance(prefetch, bool) or int(prefetch) != prefetch or prefetch < 0:
        raise CapfastError(f"prefetch must be an integer >= 0 (batches prepared ahead), got {prefetch!r}")
    return int(prefetch)


def jitter(strength) -> float:
    if not 0 <= float(strength) < 1:
        raise CapfastError(f"color jitter must be in [0, 1), got {strength}")
    return float(strength)
