import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfast.pack.images import BadImage, decode_plain_jpeg, draft_scale, load_rgb, prepare_image, prepare_jpeg, resized

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


def photo_like(width, height) -> Image.Image:
    """Smooth gradients with sharp edges and some texture, like a photo at the scale that matters here."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, 128 + 60 * np.sin(x / 9) * np.cos(y / 13)], -1)
    pixels[height // 3: height // 2, width // 4: width // 2] = (240, 240, 20)
    pixels += np.random.default_rng(0).normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_plain_jpegs_take_the_opencv_path_and_match_pil(tmp_path):
    data = jpeg_bytes(photo_like(320, 240), quality=92)
    (tmp_path / "plain.jpg").write_bytes(data)
    (tmp_path / "junk_after_end.jpg").write_bytes(data + b"\0\0")  # no end marker last: PIL decides
    with Image.open(io.BytesIO(data)) as img:
        assert decode_plain_jpeg(data, img, (64, 64)) is not None
    with Image.open(io.BytesIO(data[:-100])) as img:  # truncated
        assert decode_plain_jpeg(data[:-100], img, (64, 64)) is None
    cmyk = jpeg_bytes(two_color(mode="CMYK"))
    with Image.open(io.BytesIO(cmyk)) as img:
        assert decode_plain_jpeg(cmyk, img, (16, 16)) is None
    by_opencv = prepare_image(tmp_path / "plain.jpg", 64).astype(int)
    by_pil = prepare_image(tmp_path / "junk_after_end.jpg", 64).astype(int)
    assert np.abs(by_opencv - by_pil).mean() < 1


@pytest.mark.parametrize("source, target", [((640, 480), (256, 256)), ((1100, 900), (256, 256)),
                                            ((500, 375), (256, 192)), ((300, 700), (128, 64))])
def test_shrinking_averages_areas(source, target):
    pixels = np.asarray(photo_like(*source))
    exact = np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.BOX), dtype=int)  # area mean
    assert np.abs(resized(pixels, target).astype(int) - exact).mean() < 2


def test_large_jpegs_are_reduced_while_decoding_without_losing_quality(tmp_path):
    assert draft_scale((600, 500), (128, 128)) == 2 and draft_scale((4000, 3000), (256, 256)) == 8
    assert draft_scale((1100, 511), (256, 256)) == 1 and draft_scale((512, 1024), (256, 256)) == 2
    assert draft_scale((100, 64), (128, 128)) == 1  # smaller than the target: decoded whole, then enlarged
    path = save(photo_like(600, 500), tmp_path / "big.jpg", quality=95)  # decoded at 1/2: 300x250
    reference = np.asarray(Image.open(path).convert("RGB").resize((128, 128), Image.Resampling.BOX), dtype=int)
    assert np.abs(prepare_image(path, 128).astype(int) - reference).mean() < 2


def test_stored_jpeg_is_baseline_rgb(tmp_path):
    jpeg, height, width = prepare_jpeg(save(two_color(mode="L"), tmp_path / "g.jpg"), 32, True, quality=90)
    assert (height, width) == (16, 32)
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.mode == "RGB" and img.size == (32, 16) and "progressive" not in img.info
    assert b"\xff\xc0" in jpeg and b"\xff\xc2" not in jpeg  # SOF0 (baseline), no SOF2 (progressive)
