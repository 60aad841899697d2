"""The read side, the hot path: betons -> normalized, augmented image batches on the training device.

  build_loader(beton, batch_size=..., train=...) -> CaptionLoader   len(), num_samples, epoch(n, skip_batches)
  Batch(images, captions, ncaptions, image_ids)
  preprocess_images(images, image_size, device, dtype)   the evaluation transform, for user images
"""

from capfast.data.augment import preprocess_images
from capfast.data.loader import Batch, CaptionLoader, build_loader

__all__ = ["Batch", "CaptionLoader", "build_loader", "preprocess_images"]
