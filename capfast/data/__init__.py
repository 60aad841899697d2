"""The read side, the hot path: betons -> normalized, augmented image batches on the training device, or a
frozen trunk's cached features instead of images.

  LoaderOptions(batch_size=..., image_size=..., ...)   what a user chooses (the recipe's data.* keys)
  build_loader(beton, options, train=..., normalization=...) -> CaptionLoader   len(), num_samples, epoch(n, skip)
  build_feature_loader(data_dir, name, split, options, train=...) -> FeatureLoader   the same interface
  Batch(images, captions, ncaptions, image_ids)
  preprocess_images(images, image_size, device, dtype)   the evaluation transform, for user images
"""

from capfast.data.augment import preprocess_images
from capfast.data.feature_loader import FeatureLoader, build_feature_loader
from capfast.data.loader import Batch, CaptionLoader, build_loader
from capfast.data.options import LoaderOptions

__all__ = ["Batch", "CaptionLoader", "FeatureLoader", "LoaderOptions", "build_feature_loader", "build_loader",
           "preprocess_images"]
