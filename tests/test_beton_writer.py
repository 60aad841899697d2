"""capfast.beton_writer's failure handling around ffcv's DatasetWriter (which hangs when a worker dies)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from capfast import schema
from capfast.beton_writer import ImageSettings, Normalized, Records, write_beton
from capfast.errors import CapfastError
from capfast.images import prepare_image
from capfast.inspect_beton import BetonContents


def jpeg_file(path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40], pixels[:, 40:] = (230, 20, 20), (20, 20, 230)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue())
    return path


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.suffix in (".beton", ".tmp") or ".tmp" in p.name)


def test_writer_crash_becomes_error_without_leftovers(tmp_path):
    """ffcv's writer spins forever when a worker dies; beton_writer's watchdog turns that into CapfastError."""
    image = jpeg_file(tmp_path / "a.jpg")
    settings = ImageSettings(16, keep_aspect=False)
    wrong_dtype = np.zeros((1, 5, 18), dtype=np.int64)  # ffcv's int32 NDArrayField fails inside its worker
    records = Records([0], [image], Normalized({0: (16, 16, 3)}, {}, None), settings, wrong_dtype,
                      np.array([5]), np.array([1]))
    with pytest.raises(CapfastError, match="ffcv writer process failed"):
        write_beton(tmp_path / "x.beton", schema.beton_fields(5, 16), records, workers=1)
    assert leftovers(tmp_path) == []


def test_killed_writer_worker_becomes_error(tmp_path):
    class DyingRecords(Records):
        def __getitem__(self, j):
            os._exit(3)  # like an OOM kill: no exception, no flag

    image = jpeg_file(tmp_path / "a.jpg")
    records = DyingRecords([0], [image], Normalized({0: (16, 16, 3)}, {}, None), ImageSettings(16, False),
                           np.zeros((1, 5, 18), dtype=np.int32), np.array([5]), np.array([1]))
    with pytest.raises(CapfastError, match="exit code 3"):
        write_beton(tmp_path / "x.beton", schema.beton_fields(5, 16), records, workers=1)
    assert leftovers(tmp_path) == []


def test_writer_recomputes_images_when_there_is_no_cache(tmp_path):
    """The low-disk path: arrays are recomputed inside ffcv's writer; a file that vanished meanwhile fails."""
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for path in paths:
        jpeg_file(path)
    settings = ImageSettings(16, keep_aspect=False)

    def records():
        return Records([0, 1], paths, Normalized({0: (16, 16, 3), 1: (16, 16, 3)}, {}, None), settings,
                       np.zeros((2, 5, 18), dtype=np.int32), np.array([1, 1]), np.array([7, 8]))

    write_beton(tmp_path / "ok.beton", schema.beton_fields(5, 16), records(), workers=2)
    contents = BetonContents(tmp_path / "ok.beton")
    assert contents.image_ids.tolist() == [7, 8]
    stored = np.asarray(Image.open(io.BytesIO(contents.image_bytes(1))).convert("RGB"), dtype=int)
    assert np.abs(stored - prepare_image(paths[1], 16).astype(int)).mean() < 6
    paths[1].unlink()
    with pytest.raises(CapfastError, match="changed or vanished"):
        write_beton(tmp_path / "bad.beton", schema.beton_fields(5, 16), records(), workers=1)
    assert leftovers(tmp_path) == ["ok.beton"]
