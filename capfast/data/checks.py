"""Checks of build_loader's runtime arguments and of the beton it reads: one-line CapfastErrors for bad input.
The user's options have their rules in capfast.data.options."""

import os

import numpy as np
import torch

from capfast.data import order as orders
from capfast.data.options import KEY_PREFIX
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


def resolve_workers(workers: int) -> int:
    """ffcv threads: `workers` clamped to the cores this process may use (ffcv raises when asked for more threads
    than cores); 0: those cores shared by the ranks of this node."""
    cores = len(os.sched_getaffinity(0))
    if workers == 0:
        return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, min(int(workers), cores))


def rank_batch_size(batch_size: int, world_size: int, train: bool) -> int:
    """This rank's share of a batch over all processes. Training needs equal shares (N ranks × B/N train exactly
    like 1 × B); evaluation reads every record once whatever the shares, so it takes ceil(B / N)."""
    if not train:
        return -(-batch_size // world_size)
    if batch_size % world_size:
        raise CapfastError(f"{KEY_PREFIX}batch_size={batch_size} does not split evenly over {world_size} processes")
    return batch_size // world_size
