"""What a user chooses about the loader: the `data.*` keys of a training recipe (capfast.train.config.DataConfig
adds the split names), and what `capfast eval` and `capfast bench loader` set. build_loader checks them by these
rules (capfast.common.options), so one made in code is refused as a recipe's value would be."""

from dataclasses import dataclass

from capfast.common.options import ascending, option
from capfast.data.order import ORDERS

KEY_PREFIX = "data."  # errors name the options as a recipe's keys


@dataclass
class LoaderOptions:
    batch_size: int = option(64, min=1)          # images per batch over all processes: split over DDP ranks
    image_size: int = option(224, min=16, max=4096)
    workers: int = option(0, min=0)              # decode threads per rank; 0 = all cores / ranks of this node
    order: str = option("random", choices=ORDERS)  # random | quasi_random (larger than RAM) | sequential
    os_cache: bool = option(True)
    crop_scale: tuple[float, float] = option((0.35, 1.0), above=0, max=1, check=ascending)  # crop area / image
    crop_ratio: tuple[float, float] = option((3 / 4, 4 / 3), above=0, check=ascending)  # crop width / height
    color_jitter: float = option(0.0, min=0, below=1)
    prefetch: int = option(3, min=0)            # batches prepared ahead by a producer thread (0 = none: synchronous)
    verify: bool = option(False)                # check each record read against its checksum (~6 us a record)
