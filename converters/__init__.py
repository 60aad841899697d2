"""Readers for caption dataset formats. Each returns a `Source`: per split, the items to convert (sorted by
image id) and the problems found in the annotations (items skipped, with reasons).

    read_coco(annotations_json, image_dir, split)        COCO captions JSON + its image folder
    read_karpathy(dataset_json, image_root, splits)      Karpathy's dataset_{coco,flickr8k,flickr30k}.json
    read_folder(image_dir, captions_jsonl, split)        a folder + JSONL lines {"file", "captions"|"caption"}

Bad input (missing, unreadable, invalid JSON, wrong schema, missing image folder) raises CapfastError.
"""

from capfast.converters.coco import read_coco
from capfast.converters.common import Item, Problem, Source
from capfast.converters.folder import read_folder
from capfast.converters.karpathy import read_karpathy

__all__ = ["Item", "Problem", "Source", "read_coco", "read_karpathy", "read_folder"]
