import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfast.images import BadImage, load_rgb, prepare_image

RED, BLUE = (230, 20, 20), (20, 20, 230)


def two_color(width=80, height=40, mode="RGB") -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2:] = BLUE
    return Image.fromarray(pixels).convert(mode)


def save(img: Image.Image, path, fmt="JPEG", **options):
    img.save(path, format=fmt, **options)
    return path


def jpeg_bytes(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def close(color, expected, tol=40):
    return all(abs(int(c) - e) <= tol for c, e in zip(color, expected))


def test_square_resize_and_colors(tmp_path):
    array = prepare_image(save(two_color(), tmp_path / "a.jpg", quality=95), 32, keep_aspect=False)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert close(array[16, 4], RED) and close(array[16, 28], BLUE)


def test_keep_aspect_sets_longest_side(tmp_path):
    path = save(two_color(80, 40), tmp_path / "a.jpg")
    assert prepare_image(path, 64, keep_aspect=True).shape == (32, 64, 3)
    portrait = save(two_color(30, 90), tmp_path / "b.jpg")
    assert prepare_image(portrait, 60, keep_aspect=True).shape == (60, 20, 3)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be rotated 90 degrees clockwise for display
    path = save(two_color(80, 40), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    img = load_rgb(path)
    assert img.size == (40, 80)
    top, bottom = img.getpixel((20, 5)), img.getpixel((20, 75))
    assert close(top, RED) and close(bottom, BLUE)


@pytest.mark.parametrize("make", [
    lambda p: save(two_color(mode="L"), p),
    lambda p: save(two_color(mode="CMYK"), p),
    lambda p: save(two_color(), p, quality=90, progressive=True),
    lambda p: save(two_color(mode="RGBA"), p, fmt="PNG"),
    lambda p: save(two_color(mode="LA"), p, fmt="PNG"),
    lambda p: save(two_color().convert("P"), p, fmt="PNG"),
    lambda p: save(two_color(), p, fmt="PNG"),  # PNG named .jpg
    lambda p: save(two_color(), p, fmt="GIF"),
    lambda p: save(two_color(), p, fmt="BMP"),
    lambda p: save(two_color(), p, fmt="WEBP"),
], ids=["gray", "cmyk", "progressive", "rgba", "la", "palette", "png", "gif", "bmp", "webp"])
def test_any_mode_becomes_rgb(tmp_path, make):
    array = prepare_image(make(tmp_path / "x.jpg"), 16, keep_aspect=False)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


def test_cmyk_keeps_colors(tmp_path):
    array = prepare_image(save(two_color(mode="CMYK"), tmp_path / "c.jpg", quality=95), 32, False)
    assert close(array[16, 4], RED, tol=60) and close(array[16, 28], BLUE, tol=60)


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # left opaque red, right fully transparent
    array = prepare_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png", fmt="PNG"), 10, False)
    assert tuple(array[5, 1]) == (255, 0, 0) and tuple(array[5, 8]) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled(tmp_path):
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[:, :4] = 0
    path = save(Image.fromarray(values), tmp_path / "deep.png", fmt="PNG")
    array = prepare_image(path, 8, False)
    assert tuple(array[0, 0]) == (0, 0, 0) and tuple(array[0, 7]) == (255, 255, 255)


@pytest.mark.parametrize("content, reason", [
    (None, "missing file"),
    (b"", "empty file"),
    (b"this is not an image at all" * 10, "not an image"),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt header"),
], ids=["missing", "empty", "garbage", "broken-jpeg-header"])
def test_bad_files_raise_bad_image(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        prepare_image(path, 16, False)


def test_truncated_jpeg_raises(tmp_path):
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = jpeg_bytes(noisy)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BadImage, match="truncated"):
        prepare_image(path, 16, False)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def corrupt_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT") + 40
    return data[:start] + bytes(200) + data[start + 200:]


def test_corrupt_image_data_raises(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(corrupt_png())
    with pytest.raises(BadImage, match="corrupt image"):
        prepare_image(path, 16, False)


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(BadImage, match="not a regular file"):
        load_rgb(tmp_path / "dir.jpg")
