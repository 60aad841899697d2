"""capfast.data: the beton loader (train and eval), its augmentation, and `capfast bench loader`.

Loaders use one ffcv thread: numba compiles each loader's pipeline, and the parallel variant compiles slower.
"""

import math
import re

import numpy as np
import pytest
import torch
import torchvision.io as tio

from capfast.common.normalization import IMAGENET
from capfast.data import Batch, LoaderOptions, augment, build_loader, preprocess_images
from capfast.data.order import batch_seed
from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.beton import BetonContents

# numba prints a harmless KeyError when ffcv's compiled pipelines are garbage-collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SIZE = 32
MEAN = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
SOLID = (200, 100, 30)
# libjpeg-turbo's fast DCT (ffcv) vs its accurate DCT (torchvision) differ by a few levels
DECODER_ATOL = 6 / 255 / 0.224


def loader(beton, train=True, seed=0, device="cpu", dtype=torch.float32, distributed=False, **options):
    """SIZE² images in batches of 4 on one ffcv thread, unless `options` (LoaderOptions' fields) say otherwise."""
    options = LoaderOptions(**{"batch_size": 4, "image_size": SIZE, "workers": 1, **options})
    return build_loader(beton, options, train=train, seed=seed, device=device, dtype=dtype, distributed=distributed,
                        normalization=IMAGENET)


def write_beton(path, images, fields=None, records=None):
    from ffcv.writer import DatasetWriter

    fields = fields or schema.beton_fields(captions_per_image=2, max_len=4, checksums=False)  # ffcv's writer: format 1
    if records is None:
        records = [(image, np.full((2, 6), i, np.int32), 1 + i % 2, 100 + i) for i, image in enumerate(images)]
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(records)
    return path


def decoded(beton) -> list[torch.Tensor]:
    contents = BetonContents(beton)
    return [tio.decode_jpeg(torch.frombuffer(bytearray(contents.image_bytes(i)), dtype=torch.uint8))
            for i in range(len(contents))]


@pytest.fixture(scope="module")
def train_beton(converted):
    return converted / "train.beton"


@pytest.fixture(scope="module")
def val_beton(converted):
    return converted / "val.beton"


@pytest.fixture(scope="module")
def solid_beton(tmp_path_factory):
    image = np.empty((48, 64, 3), np.uint8)
    image[:] = SOLID
    return write_beton(tmp_path_factory.mktemp("solid") / "solid.beton", [image] * 4)


@pytest.fixture(scope="module")
def mixed_beton(tmp_path_factory):
    """Images of different sizes, as `capfast convert --keep-aspect` writes them."""
    images = []
    for h, w in [(64, 48), (40, 64), (64, 64), (33, 50), (64, 20), (50, 50)]:
        y, x = np.mgrid[0:h, 0:w]
        images.append(np.stack([x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256], -1).astype(np.uint8))
    return write_beton(tmp_path_factory.mktemp("mixed") / "mixed.beton", images)


@pytest.fixture(scope="module")
def train_epochs(train_beton):
    """Epochs 0 and 1 of one training loader (seed 0), as lists of batches."""
    train = loader(train_beton, seed=0)
    return train, list(train.epoch(0)), list(train.epoch(1))


def ids(batches) -> list[int]:
    return torch.cat([b.image_ids for b in batches]).tolist()


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.images, y.images) and torch.equal(x.captions, y.captions)
                                    and torch.equal(x.image_ids, y.image_ids) for x, y in zip(a, b))


# ---- training ---------------------------------------------------------------------------------------------

def test_train_batches_have_the_documented_shapes(train_epochs):
    train, epoch0, _ = train_epochs
    assert len(train) == len(epoch0) == 32 // 4 and train.num_samples == 32
    batch = epoch0[0]
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.captions.dtype == batch.ncaptions.dtype == batch.image_ids.dtype == torch.int64
    assert batch.captions.shape == (4, 5, 18) and batch.ncaptions.shape == batch.image_ids.shape == (4,)
    assert (batch.captions[:, 0, 0] == 1).all()  # every real caption row starts with <bos>


def test_bf16_batches(train_beton, train_epochs):
    first = next(iter(loader(train_beton, seed=0, dtype=torch.bfloat16).epoch(0)))
    assert first.images.dtype == torch.bfloat16 and first.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(first.images.float(), train_epochs[1][0].images, atol=0.05)


def test_each_epoch_is_a_new_order_of_distinct_records(train_epochs):
    _, epoch0, epoch1 = train_epochs
    assert len(set(ids(epoch0))) == len(set(ids(epoch1))) == 32
    assert ids(epoch0) != ids(epoch1)


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(train_beton, train_epochs):
    assert same_batches(list(loader(train_beton, seed=0).epoch(1)), train_epochs[2])
    assert ids(loader(train_beton, seed=1).epoch(1)) != ids(train_epochs[2])


def test_skip_batches_resumes_with_exactly_the_remaining_batches(train_epochs):
    train, _, epoch1 = train_epochs
    assert same_batches(list(train.epoch(1, skip_batches=3)), epoch1[3:])
    assert list(train.epoch(1, skip_batches=len(train))) == []


def test_train_images_are_seeded_crops_of_the_stored_images(mixed_beton):
    """The batch equals crop + resize + jitter + normalize recomputed from (seed, epoch, batch), on every size."""
    train = loader(mixed_beton, batch_size=2, seed=3, color_jitter=0.4)
    batch = list(train.epoch(2))[1]
    picked = [decoded(mixed_beton)[i] for i in train.rank_order(2)[2:4]]
    generator = torch.Generator().manual_seed(batch_seed(3, 2, 1))
    boxes = augment.random_crop_boxes(augment.image_sizes(picked), (0.35, 1.0), (3 / 4, 4 / 3), generator)
    jitter = augment.jitter_factors(2, 0.4, generator)
    resized = augment.resize_per_image(picked, boxes, SIZE).float()
    expected = augment.normalize(augment.color_jitter(resized, jitter), torch.float32, IMAGENET)
    assert (batch.images - expected).abs().mean() < 0.03
    assert torch.allclose(batch.images, expected, atol=DECODER_ATOL)


def test_the_jpeg_bytes_path_gives_the_same_batches(mixed_beton):
    """The CUDA path's data flow (stored JPEG bytes -> decode_jpegs -> padded batch -> transforms), on the CPU."""
    from dataclasses import replace

    from capfast.data.loader import CaptionLoader

    pixels = loader(mixed_beton, batch_size=3, seed=4, color_jitter=0.2)
    jpeg_bytes = CaptionLoader(mixed_beton, replace(pixels.settings, decode="batched"), pixels.shard)
    pairs = list(zip(pixels.epoch(1), jpeg_bytes.epoch(1)))
    assert len(pairs) == 2
    for a, b in pairs:
        assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.captions, b.captions)
        assert torch.allclose(a.images, b.images, atol=DECODER_ATOL)


def test_normalization_of_a_solid_colour(solid_beton):
    expected = (torch.tensor(SOLID).view(1, 3, 1, 1) / 255 - MEAN) / STD
    for train in (True, False):
        images = next(iter(loader(solid_beton, train=train).epoch(0))).images
        assert torch.allclose(images, expected.expand_as(images), atol=3 / 255 / 0.224)


def test_quasi_random_order_is_seeded_and_covers_the_split(train_beton):
    quasi = loader(train_beton, seed=5, order="quasi_random", os_cache=False)
    epoch0, epoch1 = ids(quasi.epoch(0)), ids(quasi.epoch(1))
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 32
    first = quasi.rank_order(1)
    assert list(quasi.rank_order(1)) == list(first)  # asking again (as a resumed run does) gives the same order
    assert list(quasi.rank_order(0)) != list(first)
    from capfast.data.order import quasi_random_epoch_order

    other_seed = quasi_random_epoch_order(quasi._quasi, 6, 1, quasi.settings.batch_size)
    assert sorted(other_seed) == sorted(first) and list(other_seed) != list(first)


# ---- evaluation -------------------------------------------------------------------------------------------

def test_eval_reads_every_record_once_in_file_order(val_beton):
    val = loader(val_beton, train=False, batch_size=5)
    batches = list(val.epoch(0))
    assert [len(b.image_ids) for b in batches] == [5, 5, 2] and len(val) == 3 and val.num_samples == 12
    assert ids(batches) == BetonContents(val_beton).image_ids.tolist()
    assert same_batches(list(val.epoch(7)), batches)  # no randomness at all


def test_eval_images_are_whole_images_resized(mixed_beton):
    images = torch.cat([b.images for b in loader(mixed_beton, train=False).epoch(0)])
    expected = preprocess_images(decoded(mixed_beton), image_size=SIZE)
    assert torch.allclose(images, expected, atol=DECODER_ATOL)


# ---- transforms -------------------------------------------------------------------------------------------

def test_crop_boxes_lie_inside_the_images_and_follow_scale_and_ratio():
    sizes = torch.tensor([[64, 48], [40, 64], [300, 20], [7, 9]] * 50)
    boxes = augment.random_crop_boxes(sizes, (0.35, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    normal = sizes[:, 0] == 64
    area = (h * w / (sizes[:, 0] * sizes[:, 1]))[normal]
    assert area.min() > 0.3 and (w / h)[normal].min() > 0.7 and (w / h)[normal].max() < 1.4
    again = augment.random_crop_boxes(sizes, (0.35, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def test_batched_resize_matches_per_image_resize():
    """The CUDA path's matmul resize is PyTorch's antialiased bilinear, like the CPU path's F.interpolate."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in [(64, 48), (20, 30), (64, 64), (33, 90)]]
    boxes = torch.tensor([[0, 0, 64, 48], [2, 3, 15, 20], [10, 5, 40, 50], [0, 10, 33, 70]])
    batched = augment.resize_batched(augment.pad_images(images), boxes, 40)
    exact = torch.stack([torch.nn.functional.interpolate(
        image[None, :, t:t + h, x:x + w].float(), size=(40, 40), mode="bilinear", antialias=True)[0]
        for image, (t, x, h, w) in zip(images, boxes.tolist())])
    assert (batched - exact.round()).abs().max() <= 1
    assert (batched - augment.resize_per_image(images, boxes, 40).float()).abs().max() <= 1


def test_lookup_normalization_matches_arithmetic():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        arithmetic = ((images.float() - MEAN * 255) * (1 / (STD * 255))).to(dtype)
        assert torch.equal(augment.normalize(images, dtype, IMAGENET), arithmetic)
        assert torch.equal(augment.normalize(images.float(), dtype, IMAGENET), arithmetic)


def test_preprocess_images_takes_a_list_of_sizes_or_a_batch():
    generator = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in [(50, 70), (90, 40)]]
    out = preprocess_images(images, image_size=24)
    assert out.shape == (2, 3, 24, 24) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(preprocess_images(torch.stack([images[0]] * 2), image_size=24)[1], out[0])
    with pytest.raises(CapfastError, match="uint8"):
        preprocess_images([images[0].float()], image_size=24)


# ---- bad input --------------------------------------------------------------------------------------------

def test_bad_files_raise_one_line_errors(tmp_path, train_beton):
    from ffcv.fields import IntField, RGBImageField

    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton at all" * 10)
    foreign = write_beton(tmp_path / "foreign.beton", None, fields={"label": IntField()}, records=[(1,), (2,)])
    raw_fields = {**schema.beton_fields(2, 4, checksums=False), schema.IMAGE: RGBImageField(write_mode="raw")}
    raw = write_beton(tmp_path / "raw.beton", None, fields=raw_fields,
                      records=[(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 6), np.int32), 1, 1)])
    for path, message in [(tmp_path / "missing.beton", "not found"), (junk, "not a beton"),
                          (foreign, "missing field"), (raw, "raw")]:
        with pytest.raises(CapfastError, match=message) as error:
            loader(path)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_verify_names_the_record_whose_bytes_changed(val_beton, tmp_path, device):
    import shutil

    beton = tmp_path / "val.beton"
    shutil.copy(val_beton, beton)
    contents = BetonContents(beton)
    damaged = bytearray(beton.read_bytes())
    damaged[int(contents.image_meta["data_ptr"][9]) + len(contents.image_bytes(9)) // 2] ^= 0x10
    beton.write_bytes(bytes(damaged))
    with loader(beton, train=False, device=device, verify=True).epoch(0) as batches:
        assert [len(next(batches).images) for _ in range(2)] == [4, 4]  # records 0-7 match their checksums
        with pytest.raises(CapfastError, match=rf"val.beton: record 9 \(image {contents.image_ids[9]}\) does not "
                                               "match its checksum: "):
            next(batches)
    with pytest.raises(CapfastError, match="has no record checksums .* set data.verify=false"):
        loader(write_beton(tmp_path / "old.beton", [np.zeros((8, 8, 3), np.uint8)] * 4), verify=True)


@pytest.mark.parametrize("kwargs, message", [
    # options made in code are refused as the recipe's data.* keys are (capfast.data.options)
    ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ({"image_size": 8}, "data.image_size must be an integer >= 16 and <= 4096, got 8"),
    ({"order": "shuffled"}, "data.order must be one of random, quasi_random, sequential, got \"shuffled\""),
    ({"crop_scale": (0.5, 2.0)}, "data.crop_scale must be a list of 2 numbers, each > 0 and <= 1, got [0.5, 2.0]"),
    ({"crop_ratio": (0, 1)}, "data.crop_ratio must be a list of 2 numbers, each > 0, got [0, 1]"),
    ({"crop_ratio": (1.5, 0.5)}, "data.crop_ratio must be (low, high) with low <= high, got [1.5, 0.5]"),
    ({"color_jitter": 1.5}, "data.color_jitter must be a number >= 0 and < 1, got 1.5"),
    ({"workers": -1}, "data.workers must be an integer >= 0, got -1"),
    ({"dtype": torch.int8}, "dtype"), ({"distributed": True}, "init_process_group"),
    ({"batch_size": 64}, "fewer than one batch"),
])
def test_bad_arguments_raise_one_line_errors(train_beton, kwargs, message):
    with pytest.raises(CapfastError, match=re.escape(message)) as error:
        loader(train_beton, **kwargs)
    assert "\n" not in str(error.value)


def test_crop_ratio_is_an_option(mixed_beton):
    """data.crop_ratio reaches the crops: (1, 1) draws square boxes, as random_crop_boxes does with it."""
    train = loader(mixed_beton, batch_size=2, seed=3, crop_ratio=(1, 1))
    assert train.settings.crop_ratio == (1.0, 1.0)
    batch = list(train.epoch(0))[0]
    picked = [decoded(mixed_beton)[i] for i in train.rank_order(0)[:2]]
    generator = torch.Generator().manual_seed(batch_seed(3, 0, 0))
    boxes = augment.random_crop_boxes(augment.image_sizes(picked), (0.35, 1.0), (1.0, 1.0), generator)
    expected = augment.normalize(augment.resize_per_image(picked, boxes, SIZE), torch.float32, IMAGENET)
    assert torch.allclose(batch.images, expected, atol=DECODER_ATOL)


def test_an_error_on_ffcv_s_thread_is_raised_instead_of_hanging(train_beton):
    from concurrent.futures import ThreadPoolExecutor

    def broken_stage(**_):
        raise ValueError("broken pipeline")

    train = loader(train_beton)
    train._ffcv.code = ([(broken_stage, [])], [])  # what ffcv's thread runs for every batch
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(lambda: list(train.epoch(0)))
        with pytest.raises(ValueError, match="broken pipeline"):
            outcome.result(timeout=60)


def test_stopping_early_releases_ffcv_s_thread(train_epochs):
    import threading
    import time

    train = train_epochs[0]
    before = set(threading.enumerate())
    batches = train.epoch(0, skip_batches=len(train) - 4)  # 4 batches: ffcv's thread can fill its queue and finish
    next(batches)
    started = [t for t in threading.enumerate() if t not in before]
    time.sleep(0.5)
    batches.close()
    for thread in started:
        thread.join(timeout=10)
    assert started and not any(t.is_alive() for t in started)


# ---- bench ------------------------------------------------------------------------------------------------

def bench_loader(beton, *options) -> dict:
    from click.testing import CliRunner

    from capfast.bench.loader import command

    result = CliRunner().invoke(command, ["--data", str(beton), "--batch-size", "4", "--batches", "2",
                                          "--workers", "1", "--image-size", str(SIZE), *options])
    assert result.exit_code == 0, result.output
    return dict(pair.split("=") for pair in result.output.strip().splitlines()[-1].split()), result.output


def test_bench_loader_prints_a_machine_readable_ratio_against_both_baselines(train_beton):
    values, output = bench_loader(train_beton, "--baseline", "all")
    assert list(values) == ["capfast_img_s", "baseline_img_s", "ratio", "ffcv_img_s", "ffcv_ratio",
                            "mean_jpeg_kb", "ceiling_img_s", "ceiling_fraction", "verify_img_s", "verify_ratio"]
    assert all(float(values[k]) > 0 for k in ("capfast_img_s", "baseline_img_s", "ffcv_img_s")), values
    assert all(math.isfinite(float(values[k])) for k in ("ratio", "ffcv_ratio")), values  # 2 batches: noisy
    for name, over in (("ratio", "baseline_img_s"), ("ffcv_ratio", "ffcv_img_s")):  # capfast over each baseline
        assert float(values[name]) == pytest.approx(float(values["capfast_img_s"]) / float(values[over]),
                                                    rel=0.03, abs=0.01), values
    contents = BetonContents(train_beton)
    mean_kb = np.mean([len(contents.image_bytes(i)) for i in range(len(contents))]) / 1024
    assert float(values["mean_jpeg_kb"]) == pytest.approx(mean_kb, abs=0.05) and "stored JPEGs: mean" in output
    assert values["ceiling_img_s"] == values["ceiling_fraction"] == "nan"  # the decode ceiling is timed on CUDA
    assert values["verify_img_s"] == values["verify_ratio"] == "nan"
    plain, _ = bench_loader(train_beton, "--baseline", "--verify")  # plain --baseline: DataLoader + PIL only
    assert float(plain["ratio"]) > 0 and plain["ffcv_img_s"] == plain["ffcv_ratio"] == "nan"
    assert float(plain["verify_ratio"]) == pytest.approx(float(plain["verify_img_s"]) / float(plain["capfast_img_s"]),
                                                         rel=0.03, abs=0.01)  # the loader with data.verify over it


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_batches_match_the_cpu_path(train_beton, train_epochs):
    """nvJPEG vs libjpeg-turbo decode and float vs uint8 resize rounding: a few levels apart, same crops."""
    cuda = list(loader(train_beton, seed=0, device="cuda", dtype=torch.bfloat16).epoch(1))
    assert ids(cuda) == ids(train_epochs[2])
    for gpu, cpu in zip(cuda, train_epochs[2]):
        assert gpu.images.device.type == "cuda" and gpu.images.dtype == torch.bfloat16
        assert gpu.images.is_contiguous(memory_format=torch.channels_last)
        assert (gpu.images.float().cpu() - cpu.images).abs().mean() < 0.03
        assert torch.equal(gpu.captions.cpu(), cpu.captions)


@pytest.mark.gpu
def test_cuda_eval_and_preprocess_match_the_cpu(mixed_beton):
    cuda = torch.cat([b.images.cpu() for b in loader(mixed_beton, train=False, device="cuda").epoch(0)])
    cpu = torch.cat([b.images for b in loader(mixed_beton, train=False).epoch(0)])
    assert (cuda - cpu).abs().mean() < 0.03
    images = decoded(mixed_beton)
    on_gpu = preprocess_images(images, image_size=SIZE, device="cuda").cpu()
    assert (on_gpu - preprocess_images(images, image_size=SIZE)).abs().max() <= 2 / 255 / 0.224


@pytest.mark.gpu
def test_cuda_loader_runs_epochs_at_224(train_beton):
    """Its speed is `capfast bench loader --device cuda`'s line, not an assertion here."""
    cuda = build_loader(train_beton, LoaderOptions(batch_size=8, image_size=224), train=True, device="cuda",
                        dtype=torch.bfloat16, normalization=IMAGENET)
    count = sum(len(b.image_ids) for epoch in range(0, 3) for b in cuda.epoch(epoch))
    assert count == 3 * 32
