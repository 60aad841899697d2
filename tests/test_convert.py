import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from capfast.common.lock import LOCK_FILE, RunLock
from capfast.errors import CapfastError
from capfast.pack.convert import convert
from capfast.pack.images import prepare_image
from capfast.store import schema
from capfast.store.beton import BetonContents
from capfast.store.ptb_tokenizer import tokenize
from capfast.store.vocab import Vocab

RED, BLUE = (230, 20, 20), (20, 20, 230)


# ---- helpers ----------------------------------------------------------------------------------------------

def coco_json(path, images, captions):
    """images: [(id, file_name)], captions: [(image_id, text)] -> a COCO captions file."""
    data = {"info": {}, "licenses": [],
            "images": [{"id": i, "file_name": f, "width": 1, "height": 1} for i, f in images],
            "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions, 1)]}
    path.write_text(json.dumps(data))
    return path


def decoded(contents: BetonContents, i: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(contents.image_bytes(i))).convert("RGB"))


def records(path):
    contents = BetonContents(path)
    return [(int(contents.image_ids[i]), int(contents.ncaptions[i]), contents.captions(i).tobytes(),
             contents.image_bytes(i)) for i in range(len(contents))]


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.suffix in (".beton", ".tmp") or ".tmp" in p.name)


def coco_captions(root, split):
    data = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
    captions = {}
    for annotation in data["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    files = {image["id"]: root / "images" / split / image["file_name"] for image in data["images"]}
    return captions, files


# ---- round trip -------------------------------------------------------------------------------------------

def test_round_trip_with_ffcv_loader(converted, synth_coco):
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    captions, files = coco_captions(synth_coco, "train")
    vocab = Vocab.load(converted / schema.VOCAB_FILE)
    loader = Loader(str(converted / "train.beton"), batch_size=10, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()], "captions": [NDArrayDecoder()],
                                                "ncaptions": [IntDecoder()], "image_id": [IntDecoder()],
                                                "checksum": None})
    batches = [[np.array(x) for x in batch] for batch in loader]
    images, rows, counts, ids = (np.concatenate(parts) for parts in zip(*batches))
    assert ids[:, 0].tolist() == sorted(captions)  # every image, sorted by image id
    assert images.shape == (32, 64, 64, 3) and rows.shape == (32, 5, 18) and rows.dtype == np.int32
    for image, row, count, (image_id,) in zip(images, rows, counts[:, 0], ids):
        assert count == 5
        expected = [" ".join(tokenize(c)[:16]) for c in captions[image_id]]
        assert [vocab.decode(r) for r in row] == expected
        reference = prepare_image(files[image_id], 64, keep_aspect=False).astype(np.int32)
        assert np.abs(image.astype(np.int32) - reference).mean() < 6  # JPEG q90 noise only


def test_refs_vocab_and_meta(converted, synth_coco):
    captions, _ = coco_captions(synth_coco, "val")
    refs = json.loads((converted / "refs_val.json").read_text())
    assert refs == {str(i): c for i, c in captions.items()}
    train_captions, _ = coco_captions(synth_coco, "train")
    vocab = Vocab.load(converted / "vocab.json")
    train_words = {t for texts in train_captions.values() for c in texts for t in tokenize(c)}
    assert set(vocab.words[4:]) == train_words  # min_count 1, built from train only
    meta = json.loads((converted / "meta.json").read_text())
    assert meta["format_version"] == schema.FORMAT_VERSION and set(meta["splits"]) == {"train", "val"}
    val = meta["splits"]["val"]
    assert val["counts"]["images"] == 12 and val["counts"]["captions"] == 60 and val["counts"]["skipped"] == 0
    assert val["settings"]["image_size"] == 64 and val["source"]["format"] == "coco"
    assert val["settings"]["vocab_fingerprint"] == vocab.fingerprint()
    assert leftovers(converted) == ["train.beton", "val.beton"]


def test_output_bytes_do_not_depend_on_workers(converted, synth_coco, tmp_path):
    convert(tmp_path, "train", annotations=synth_coco / "annotations" / "captions_train.json",
            images=synth_coco / "images" / "train", image_size=64, min_count=1, workers=1, progress=False)
    assert (tmp_path / "train.beton").read_bytes() == (converted / "train.beton").read_bytes()  # 2 workers


def files_open_in(pid: int, folder) -> list[str]:
    """What process `pid` holds open inside `folder` (an unnamed file shows as "folder/#inode (deleted)")."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{folder}/"):
            found.append(target)
    return found


def wait_until(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE and PR_SET_PDEATHSIG are Linux's")
def test_kill_9_mid_write_leaves_nothing_behind(tmp_path):
    """SIGKILL while the beton is being written: no partial beton, no temporary file, no orphaned worker."""
    (tmp_path / "images").mkdir()
    stripes = np.zeros((2400, 2400), np.uint8)
    stripes[::7] = 255
    Image.fromarray(stripes).save(tmp_path / "images" / "big.png", compress_level=1)  # slow to decode
    ids = range(1, 17)
    coco_json(tmp_path / "captions.json", [(i, "big.png") for i in ids], [(i, "a striped picture") for i in ids])
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=convert, args=(out, "train"), kwargs=dict(
        annotations=tmp_path / "captions.json", images=tmp_path / "images", image_size=64, min_count=1,
        workers=2, progress=False))
    child.start()
    process = psutil.Process(child.pid)
    wait_until(lambda: not child.is_alive() or (files_open_in(child.pid, out) and len(process.children()) == 2),
               "convert writes its beton", timeout=300)  # the child may import ffcv itself
    workers = process.children()
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        wait_until(lambda: all(map(ended, workers)), "the workers end", timeout=20)
        assert os.listdir(out) == [LOCK_FILE]  # the lock's file: empty once its holder died
    finally:
        for worker in workers:
            if not ended(worker):
                worker.kill()


def test_vocab_reuse_and_overwrite(converted, synth_coco, tmp_path, capfast_cli):
    args = ("convert", "--annotations", synth_coco / "annotations" / "captions_val.json",
            "--images", synth_coco / "images" / "val", "--split", "val", "--out", tmp_path,
            "--image-size", 64, "--vocab", converted / "vocab.json", "--workers", 2)
    first = capfast_cli(*args)
    assert first.code == 0
    assert "split 'val': 5 of 60 captions (8.3 %) are longer than --max-len 16 tokens" in first.stderr
    assert "--max-len 20 keeps 99 % whole" in first.stderr
    assert Vocab.load(tmp_path / "vocab.json") == Vocab.load(converted / "vocab.json")
    assert records(tmp_path / "val.beton") == records(converted / "val.beton")
    before = (tmp_path / "val.beton").stat().st_mtime_ns
    refused = capfast_cli(*args)
    assert refused.code == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "val.beton").stat().st_mtime_ns == before
    again = capfast_cli(*args, "--overwrite", "--captions-per-image", 3, "--max-len", 20)
    assert again.code == 0 and "longer than --max-len" not in again.stderr
    assert BetonContents(tmp_path / "val.beton").caption_shape == (3, 22)
    assert leftovers(tmp_path) == ["val.beton"]
    with RunLock(tmp_path):  # as a convert into the same --out still running holds it
        refused = capfast_cli(*args, "--overwrite")
    assert refused.code == 2 and f"{tmp_path} is in use by pid {os.getpid()}" in refused.stderr
    assert BetonContents(tmp_path / "val.beton").caption_shape == (3, 22)


def test_the_suggested_max_len_keeps_99_percent_whole():
    from collections import Counter

    from capfast.pack.convert import Written

    written = Written(lengths=Counter({8: 950, 17: 30, 25: 19, 60: 1}))
    assert written.captions == 1000 and written.cut(16) == 50 and written.cut(25) == 1
    assert [written.length_keeping(percent) for percent in (95, 98, 99, 100)] == [8, 17, 25, 60]


def test_val_uses_existing_vocab_json(converted, synth_coco, tmp_path):
    shutil.copy(converted / "vocab.json", tmp_path / "vocab.json")
    convert(tmp_path, "val", annotations=synth_coco / "annotations" / "captions_val.json",
            images=synth_coco / "images" / "val", image_size=64, workers=2, progress=False)
    assert records(tmp_path / "val.beton") == records(converted / "val.beton")


# ---- odd and bad images -----------------------------------------------------------------------------------

def two_color(width=80, height=40):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2], pixels[:, width // 2:] = RED, BLUE
    return Image.fromarray(pixels)


def jpeg(img, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=options.pop("format", "JPEG"), **options)
    return buffer.getvalue()


def odd_files() -> dict:
    """file name -> bytes (None: referenced but missing)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored pixels rotated 90 degrees clockwise
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    broken_png = jpeg(noisy, format="PNG")
    start = broken_png.index(b"IDAT") + 40
    return {
        "plain.jpg": jpeg(two_color(), quality=95),
        "gray.jpg": jpeg(two_color().convert("L")),
        "cmyk.jpg": jpeg(two_color().convert("CMYK"), quality=95),
        "png_named.jpg": jpeg(two_color(), format="PNG"),
        "progressive.jpg": jpeg(two_color(), progressive=True, quality=95),
        "rotated.jpg": jpeg(two_color(), exif=exif.tobytes(), quality=95),
        "rgba.png": jpeg(two_color().convert("RGBA"), format="PNG"),
        "truncated.jpg": jpeg(noisy)[:900],
        "corrupt.png": broken_png[:start] + bytes(200) + broken_png[start + 200:],
        "garbage.jpg": b"definitely not an image" * 20,
        "empty.jpg": b"",
        "missing.jpg": None,
    }


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    (root / "images").mkdir()
    images = []
    for image_id, (name, data) in enumerate(odd_files().items(), start=1):
        images.append((image_id * 10, name))
        if data is not None:
            (root / "images" / name).write_bytes(data)
    (root / "images" / "uncaptioned.jpg").write_bytes(jpeg(two_color()))
    images.append((999, "uncaptioned.jpg"))
    captions = [(i, f"A red and blue picture number {i}.") for i, _ in images if i != 999]
    captions.append((12345, "a caption for an image that does not exist"))
    coco_json(root / "captions.json", images, captions)
    out = root / "out"
    convert(out, "train", annotations=root / "captions.json", images=root / "images", image_size=64,
            keep_aspect=True, min_count=1, workers=2, progress=False)
    return out, {name: i for i, name in images}


def test_odd_images_are_converted_upright(odd_dataset):
    out, ids = odd_dataset
    contents = BetonContents(out / "train.beton")
    by_id = {int(image_id): n for n, image_id in enumerate(contents.image_ids)}
    good = ["plain.jpg", "gray.jpg", "cmyk.jpg", "png_named.jpg", "progressive.jpg", "rotated.jpg", "rgba.png"]
    assert sorted(by_id) == sorted(ids[name] for name in good)
    for name in good:
        n = by_id[ids[name]]
        pixels = decoded(contents, n).astype(np.int32)
        if name == "rotated.jpg":
            assert contents.image_size(n) == (32, 64)  # portrait once the EXIF rotation is applied
            top, bottom = pixels[4, 16], pixels[60, 16]
        else:
            assert contents.image_size(n) == (64, 32)
            top, bottom = pixels[16, 4], pixels[16, 60]  # here: left and right
        if name == "gray.jpg":
            assert abs(top[0] - top[2]) < 8 and abs(top[0] - bottom[0]) > 20
        else:
            assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], name


def test_bad_images_and_annotations_are_reported(odd_dataset):
    out, ids = odd_dataset
    meta = json.loads((out / "meta.json").read_text())["splits"]["train"]
    reasons = {entry.get("file") or entry["image_id"]: entry["reason"] for entry in meta["skipped"]}
    assert "truncated" in reasons["truncated.jpg"]
    assert "corrupt image" in reasons["corrupt.png"]
    assert "not an image" in reasons["garbage.jpg"]
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["missing.jpg"] == "missing file"
    assert reasons["uncaptioned.jpg"] == "image has no captions"
    assert "unknown image id" in reasons[12345]
    assert meta["counts"] == {"images": 7, "captions": 7, "captions_in_beton": 7, "truncated_captions": 0,
                              "skipped": 7}
    refs = json.loads((out / "refs_train.json").read_text())
    assert str(ids["truncated.jpg"]) not in refs and len(refs) == 7


def test_skips_are_summarized_on_stderr(odd_dataset, capfast_cli, tmp_path):
    out, _ = odd_dataset
    source = out.parent
    result = capfast_cli("convert", "--annotations", source / "captions.json", "--images", source / "images",
                         "--split", "train", "--out", tmp_path, "--image-size", 32, "--min-count", 1, "--workers", 1)
    assert result.code == 0
    assert "skipped 7 item(s)" in result.stderr and "img/s" in result.stderr


# ---- other input formats ----------------------------------------------------------------------------------

def test_karpathy_format(synth_coco, tmp_path):
    results = convert(tmp_path, karpathy=synth_coco / "dataset_coco.json", images=synth_coco / "images",
                      image_size=32, min_count=1, workers=2, progress=False)
    splits = {}
    for image in json.loads((synth_coco / "dataset_coco.json").read_text())["images"]:
        name = "train" if image["split"] in ("train", "restval") else image["split"]
        splits.setdefault(name, []).append(image["cocoid"])
    assert set(results) == {"train", "val", "test"}
    for name, ids in splits.items():
        assert BetonContents(tmp_path / f"{name}.beton").image_ids.tolist() == sorted(ids)
    assert len(splits["train"]) == 36  # 32 train + 4 restval
    assert json.loads((tmp_path / "meta.json").read_text())["splits"]["test"]["source"]["format"] == "karpathy"


def test_karpathy_val_only_builds_vocab_from_train(converted, synth_coco, tmp_path):
    convert(tmp_path, "val", karpathy=synth_coco / "dataset_coco.json", images=synth_coco / "images",
            image_size=32, min_count=1, workers=1, progress=False)
    assert not (tmp_path / "train.beton").exists() and (tmp_path / "val.beton").exists()
    train_tokens = {t for i in json.loads((synth_coco / "dataset_coco.json").read_text())["images"]
                    if i["split"] in ("train", "restval") for s in i["sentences"] for t in s["tokens"]}
    assert set(Vocab.load(tmp_path / "vocab.json").words[4:]) == train_tokens


def test_folder_with_jsonl(synth_coco, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((synth_coco / "images" / "val").glob("*.jpg"))[:3]
    for n, source in enumerate(sources):
        shutil.copy(source, folder / f"p{n}.jpg")
    lines = [
        {"file": "p0.jpg", "captions": [f"caption {k} of a red thing" for k in range(7)]},
        {"file": "p1.jpg", "caption": "one red caption only"},
        {"file": "p2.jpg", "captions": ["first"], "image_id": 500},
        {"file": "p2.jpg", "captions": ["second"], "image_id": 500},
        {"file": "nothing_here.jpg", "caption": "no such file"},
    ]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    convert(tmp_path / "out", "train", folder=folder, captions=jsonl, image_size=32, min_count=1, workers=2,
            progress=False)
    contents = BetonContents(tmp_path / "out" / "train.beton")
    assert contents.image_ids.tolist() == [0, 1, 500]
    assert contents.ncaptions.tolist() == [5, 1, 2]
    assert (contents.captions(1)[1:] == 0).all()  # rows past ncaptions are padding
    refs = json.loads((tmp_path / "out" / "refs_train.json").read_text())
    assert len(refs["0"]) == 7 and refs["500"] == ["first", "second"]
    skipped = json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["train"]["skipped"]
    assert skipped == [{"image_id": 4, "file": "nothing_here.jpg", "reason": "missing file"}]


# ---- bad input --------------------------------------------------------------------------------------------

def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    # name: (builder(tmp, synth) -> extra CLI args, expected words in the message)
    "missing annotations": (lambda t, s: ["--annotations", t / "nope.json", "--images", s / "images/train"],
                            "annotations file not found"),
    "annotations is a directory": (lambda t, s: ["--annotations", s / "images", "--images", s / "images/train"],
                                   "is not a file"),
    "invalid json": (lambda t, s: ["--annotations", write(t / "a.json", "{oops"), "--images", s / "images/train"],
                     "not valid JSON"),
    "not utf-8": (lambda t, s: ["--annotations", t / "b.json", "--images", s / "images/train"], "cannot read"),
    "wrong schema": (lambda t, s: ["--annotations", write(t / "a.json", "[1, 2]"), "--images", s / "images/train"],
                     "not COCO captions format"),
    "missing annotations list": (lambda t, s: ["--annotations", write(t / "a.json", '{"images": []}'),
                                               "--images", s / "images/train"], "missing list 'annotations'"),
    "annotation without caption": (
        lambda t, s: ["--annotations", write(t / "a.json", '{"images": [{"id": 1, "file_name": "x.jpg"}], '
                                                         '"annotations": [{"id": 1, "image_id": 1}]}'),
                      "--images", s / "images/train"], "annotations[0] lacks"),
    "missing image dir": (lambda t, s: ["--annotations", s / "annotations/captions_train.json",
                                        "--images", t / "no_dir"], "image directory not found"),
    "no valid images": (lambda t, s: ["--annotations", s / "annotations/captions_train.json",
                                      "--images", s / "images/val"], "no valid images"),
    "output is a file": (lambda t, s: ["--annotations", s / "annotations/captions_train.json",
                                       "--images", s / "images/train", "--out", write(t / "file", "x")],
                         "cannot create output directory"),
    "no input": (lambda t, s: [], "give exactly one input"),
    "two inputs": (lambda t, s: ["--annotations", "a.json", "--folder", "x", "--images", "y"],
                   "give exactly one input"),
    "val without vocab": (lambda t, s: ["--annotations", s / "annotations/captions_val.json",
                                        "--images", s / "images/val", "--split", "val"],
                          "convert the train split first or pass --vocab"),
    "bad vocab file": (lambda t, s: ["--annotations", s / "annotations/captions_val.json", "--images",
                                     s / "images/val", "--split", "val", "--vocab", write(t / "v.json", "[]")],
                       "not a capfast vocabulary file"),
    "bad jsonl line": (lambda t, s: ["--folder", s / "images/val", "--captions",
                                     write(t / "c.jsonl", '{"file": "a.jpg", "caption": "x"}\n{bad\n')],
                       "line 2 is not valid JSON"),
    "jsonl wrong schema": (lambda t, s: ["--folder", s / "images/val", "--captions",
                                         write(t / "c.jsonl", '{"file": "a.jpg", "captions": "x"}\n')],
                           "expected 'captions' (list of strings)"),
    "karpathy wrong schema": (lambda t, s: ["--karpathy", write(t / "k.json", '{"images": [{"split": "x"}]}'),
                                            "--images", s / "images"], "images[0] lacks"),
    "karpathy unknown split": (lambda t, s: ["--karpathy", s / "dataset_coco.json", "--images", s / "images",
                                             "--split", "dev"], "unknown Karpathy split"),
    "bad quality": (lambda t, s: ["--annotations", s / "annotations/captions_train.json",
                                  "--images", s / "images/train", "--quality", 0], "--quality must be"),
    "bad split name": (lambda t, s: ["--annotations", s / "annotations/captions_train.json",
                                     "--images", s / "images/train", "--split", "../x"],
                       "--split must be a split name"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line(case, synth_coco, tmp_path, capfast_cli):
    build, expected = BAD_INPUTS[case]
    (tmp_path / "b.json").write_bytes(b'{"images": "\xff\xfe"}')
    args = [str(a) for a in build(tmp_path, synth_coco)]
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", out]
    if "--split" not in args and "--karpathy" not in args:
        args += ["--split", "train"]
    result = capfast_cli("convert", *args, "--workers", 1)
    message_lines = [line for line in result.stderr.splitlines() if line.startswith("capfast: error:")]
    assert result.code == 2, result.stderr
    assert len(message_lines) == 1 and expected in message_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if out.exists():
        assert leftovers(out) == []


def test_convert_api_raises_capfast_error(tmp_path):
    with pytest.raises(CapfastError, match="--split is required"):
        convert(tmp_path, annotations=tmp_path / "a.json", images=tmp_path)
