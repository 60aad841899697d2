"""capfast: fast image-captioning training on MS-COCO."""

__version__ = "0.1.0"
