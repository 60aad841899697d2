"""Image validation and normalization: any readable image file -> upright RGB uint8 array of a fixed size.

Every image goes through `prepare_image` before it reaches the FFCV writer, because ffcv's DatasetWriter hangs
forever when one of its workers raises. Files that cannot be fully decoded raise `BadImage`. Decoders are
tolerant, though: a JPEG with damaged scan data but intact markers decodes (with artifacts) and passes.

Mode handling: transparent images (RGBA, LA, P/PA with transparency) are composited on white, so a
transparent logo keeps its outline instead of turning black; 16-bit and float grayscale are scaled to 8 bits;
everything else goes through PIL's convert("RGB") (L, 1, P, CMYK, YCbCr).
"""

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail during validation rather than be silently padded with gray.
ImageFile.LOAD_TRUNCATED_IMAGES = False

WHITE = (255, 255, 255)


class BadImage(Exception):
    """An image file that cannot be used; `reason` is a short human-readable explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_rgb(path, draft_size: int | None = None) -> Image.Image:
    """Fully decoded, EXIF-upright RGB image. draft_size lets JPEG decode at a reduced scale whose
    sides stay >= draft_size (much faster for large photos); None decodes at full size."""
    path = Path(path)
    check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft_size:
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise BadImage("not an image (unknown format or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("image too large (decompression bomb limit)") from None
    except BadImage:
        raise
    except OSError as e:
        raise BadImage(describe_decode_error(e)) from None
    except Exception as e:  # corrupt files surface as SyntaxError, ValueError, struct.error, IndexError, ...
        raise BadImage(f"corrupt image ({e.__class__.__name__}: {first_line(e)})") from None


def check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as e:
        raise BadImage(f"unreadable file ({e.strerror})") from None
    if not path.is_file():
        raise BadImage("not a regular file")
    if size == 0:
        raise BadImage("empty file")


def describe_decode_error(e: OSError) -> str:
    message = first_line(e)
    if "truncated" in message.lower():
        return f"truncated image ({message})"
    if e.strerror:
        return f"unreadable file ({e.strerror})"
    return f"corrupt image ({message})"


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else e.__class__.__name__


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        return composite_on_white(img)
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(scale_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise BadImage(f"unsupported image mode {img.mode}") from None


def composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Maps high bit-depth grayscale to 0..255: 16-bit integers by /257, floats in [0, 1] by *255."""
    values = values.astype(np.float64)
    if mode == "F" and values.size and values.max() <= 1.0:
        values = values * 255.0
    elif values.size and values.max() > 255:
        values = values / 257.0
    return np.clip(values.round(), 0, 255).astype(np.uint8)


def resized(img: Image.Image, size: int, keep_aspect: bool) -> np.ndarray:
    if keep_aspect:
        scale = size / max(img.size)
        target = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    else:
        target = (size, size)
    pixels = np.asarray(img, dtype=np.uint8)
    if target == img.size:
        return pixels
    if target[0] <= img.width and target[1] <= img.height:
        # Area averaging is the right antialiasing filter for shrinking, and OpenCV's is ~2x faster than PIL's.
        return cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    return np.asarray(img.resize(target, Image.Resampling.BICUBIC), dtype=np.uint8)


def prepare_image(path, size: int, keep_aspect: bool = False) -> np.ndarray:
    """Validated, upright RGB uint8 array: size x size, or with keep_aspect the longest side = size.
    Raises BadImage for missing, empty, truncated, corrupt or unsupported files."""
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    img = load_rgb(path, draft_size=size)
    return np.ascontiguousarray(resized(img, size, keep_aspect))
