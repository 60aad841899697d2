"""The read side, the hot path: betons -> normalized, augmented image batches on the training device.

  LoaderOptions(batch_size=..., image_size=..., ...)   what a user chooses (the recipe's data.* keys)
  build_loader(beton, options, train=..., normalization=...) -> CaptionLoader   len(), num_samples, epoch(n, skip)
  Batch(images, captions, ncaptions, image_ids)
  preprocess_images(images, image_size, device, dtype)   the evaluation transform, for user images
"""

from capfast.data.augment import preprocess_images
from capfast.data.loader import Batch, CaptionLoader, build_loader
from capfast.data.options import LoaderOptions

__all__ = ["Batch", "CaptionLoader", "LoaderOptions", "build_loader", "preprocess_images"]
