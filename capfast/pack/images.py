"""Image validation and normalization: any readable image file -> upright RGB pixels of a fixed size -> the
baseline JPEG that `capfast convert` stores.

`prepare_jpeg` runs in convert's worker processes, so a bad file is caught there and never reaches the beton:
files that cannot be fully decoded raise `BadImage`. Decoders are tolerant, though: a JPEG with damaged scan
data but intact markers decodes (with artifacts) and passes.

Decoding: a plain JPEG (YCbCr or gray, no EXIF rotation, ending in its end-of-image marker, so not truncated)
goes straight to OpenCV's libjpeg-turbo, about twice as fast as PIL's path; everything else goes through PIL.
Both shrink large JPEGs by 1/2, 1/4 or 1/8 while decoding when the result stays at least the target size.
Mode handling: transparent images (RGBA, LA, P/PA with transparency) are composited on white, so a
transparent logo keeps its outline instead of turning black; 16-bit and float grayscale are scaled to 8 bits;
everything else goes through PIL's convert("RGB") (L, 1, P, CMYK, YCbCr).
"""

import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail during validation rather than be silently padded with gray.
ImageFile.LOAD_TRUNCATED_IMAGES = False

WHITE = (255, 255, 255)
NEAR = 1.25  # shrinking by at most this much, bilinear alone averages well enough (see shrink)
ORIENTATION_TAG = 0x0112
END_OF_IMAGE = b"\xff\xd9"
DECODE_SCALES = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}
# Baseline (not progressive), 4:2:0: what ffcv's RGBImageField writes and what GPU JPEG decoders take fastest.
JPEG_OPTIONS = (cv2.IMWRITE_JPEG_PROGRESSIVE, 0, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)


class BadImage(Exception):
    """An image file that cannot be used; `reason` is a short human-readable explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- the convert path: file -> sized pixels -> JPEG --------------------------------------------------------

def prepare_jpeg(path, size: int, keep_aspect: bool, quality: int) -> tuple[bytes, int, int]:
    """(baseline RGB JPEG bytes, height, width) of the validated, upright, resized image."""
    pixels = prepare_bgr(path, size, keep_aspect)
    return encode_jpeg(pixels, quality), pixels.shape[0], pixels.shape[1]


def prepare_image(path, size: int, keep_aspect: bool = False) -> np.ndarray:
    """Validated, upright RGB uint8 array: size x size, or with keep_aspect the longest side = size.
    Raises BadImage for missing, empty, truncated, corrupt or unsupported files."""
    return cv2.cvtColor(prepare_bgr(path, size, keep_aspect), cv2.COLOR_BGR2RGB)


def encode_jpeg(bgr: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", bgr, (cv2.IMWRITE_JPEG_QUALITY, quality) + JPEG_OPTIONS)
    if not ok:
        raise BadImage("cannot encode as JPEG")
    return encoded.tobytes()


def prepare_bgr(path, size: int, keep_aspect: bool) -> np.ndarray:
    """Like prepare_image, in OpenCV's BGR channel order (what its resize and JPEG encoder work in)."""
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    data = read_file(Path(path))
    with opened(io.BytesIO(data)) as img:
        target = target_size(img.size, size, keep_aspect)
        pixels = decode_plain_jpeg(data, img, target)
        if pixels is None:
            upright = decoded(img, target)
            target = target_size(upright.size, size, keep_aspect)  # EXIF rotation may have swapped the sides
            pixels = cv2.cvtColor(np.asarray(upright), cv2.COLOR_RGB2BGR)
    return resized(pixels, target)


def decode_plain_jpeg(data: bytes, img: Image.Image, target: tuple[int, int]) -> np.ndarray | None:
    """BGR pixels by OpenCV for a plain JPEG; None when the file needs PIL (other formats, CMYK, EXIF
    rotation, a missing end marker: OpenCV would pad a truncated file with gray instead of failing)."""
    plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and data.endswith(END_OF_IMAGE)
             and img.getexif().get(ORIENTATION_TAG, 1) == 1)
    if not plain:
        return None
    flags = DECODE_SCALES[draft_scale(img.size, target)] | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    return pixels if pixels is not None and pixels.ndim == 3 else None  # a failure: PIL names the problem


def draft_scale(stored: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest JPEG decode-time reduction (1, 2, 4 or 8) that keeps both sides >= the target's."""
    fits = min(stored[0] // target[0], stored[1] // target[1])
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)  # 1 also when smaller than the target


def target_size(stored: tuple[int, int], size: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) to resize to."""
    if not keep_aspect:
        return size, size
    scale = size / max(stored)
    return max(1, round(stored[0] * scale)), max(1, round(stored[1] * scale))


def resized(pixels: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """`pixels` resized to target (width, height): area averaging along the sides that shrink, bicubic along
    those that grow."""
    height, width = pixels.shape[:2]
    shrunk = (min(width, target[0]), min(height, target[1]))
    if shrunk != (width, height):
        pixels = shrink(pixels, shrunk)
    if shrunk != target:
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(pixels)


def shrink(pixels: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Area averaging, at about half the cost of OpenCV's INTER_AREA for non-integer factors (its slow path)
    and within a fraction of a level of it on photos: bilinear to twice the target (halving first while a side
    is >= 4x its target), then OpenCV's fast exact 2x2 average. Within 1.25x of the target, plain bilinear
    (every source pixel already counts)."""
    height, width = pixels.shape[:2]
    if width <= NEAR * target[0] and height <= NEAR * target[1]:
        return cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR)
    twice = (2 * target[0], 2 * target[1])
    while width >= 2 * twice[0] or height >= 2 * twice[1]:
        width = width // 2 if width >= 2 * twice[0] else width
        height = height // 2 if height >= 2 * twice[1] else height
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)  # even side: exact 1:2 mean
    if (width, height) != twice:
        pixels = cv2.resize(pixels, twice, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)


# ---- reading and decoding with PIL -------------------------------------------------------------------------

def read_file(path: Path) -> bytes:
    check_file(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadImage(f"unreadable file ({e.strerror or e})") from None


def load_rgb(path, draft_size: int | None = None) -> Image.Image:
    """Fully decoded, EXIF-upright RGB image. draft_size lets JPEG decode at a reduced scale whose
    sides stay >= draft_size (much faster for large photos); None decodes at full size."""
    path = Path(path)
    check_file(path)
    with opened(path) as img:
        return decoded(img, (draft_size, draft_size) if draft_size else None)


@contextmanager
def opened(file):
    """`with opened(file) as img`: PIL's lazy Image.open; a bad file raises BadImage, also when it fails while
    being decoded inside the block."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                yield img
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


def decoded(img: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """The fully decoded, EXIF-upright RGB image; a JPEG is reduced while decoding when target allows."""
    if target:
        img.draft("RGB", target)
    img.load()
    return to_rgb(ImageOps.exif_transpose(img, in_place=False) if has_rotation(img) else img)


def has_rotation(img: Image.Image) -> bool:
    return img.getexif().get(ORIENTATION_TAG, 1) != 1


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
