import json

import numpy as np
from PIL import Image

from capfast.pack.synth import ANCHORS, COLORS, SHAPES, make_synthetic_coco
from capfast.store.ptb_tokenizer import tokenize


def all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", n_train=6, n_val=3, seed=7, karpathy=True)
    b = make_synthetic_coco(tmp_path / "b", n_train=6, n_val=3, seed=7, karpathy=True)
    c = make_synthetic_coco(tmp_path / "c", n_train=6, n_val=3, seed=8, karpathy=True)
    assert all_files(a) == all_files(b)
    assert all_files(a) != all_files(c)


def test_coco_captions_schema(synth_coco):
    ids = {}
    for split, count in (("train", 32), ("val", 12)):
        data = json.loads((synth_coco / "annotations" / f"captions_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations"} <= set(data)
        assert len(data["images"]) == count
        for image in data["images"]:
            path = synth_coco / "images" / split / image["file_name"]
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert img.size == (image["width"], image["height"])
                assert 64 <= min(img.size) <= max(img.size) <= 160
            ids[image["id"]] = split
        per_image = {}
        for annotation in data["annotations"]:
            assert {"id", "image_id", "caption"} <= set(annotation)
            per_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
        assert set(per_image) == {image["id"] for image in data["images"]}
        assert all(len(captions) == 5 and len(set(captions)) == 5 for captions in per_image.values())
    assert len(ids) == 44  # image ids are unique across splits


def test_landscape_and_portrait_images(synth_coco):
    data = json.loads((synth_coco / "annotations" / "captions_train.json").read_text())
    shapes = {(image["width"] > image["height"], image["width"] < image["height"]) for image in data["images"]}
    assert (True, False) in shapes and (False, True) in shapes


def test_captions_name_what_is_drawn(synth_coco):
    """Every caption names a shape and a color; the first-named color is drawn at the named position."""
    data = json.loads((synth_coco / "annotations" / "captions_train.json").read_text())
    files = {image["id"]: image["file_name"] for image in data["images"]}
    checked = 0
    for annotation in data["annotations"]:
        tokens = tokenize(annotation["caption"])
        assert set(tokens) & set(SHAPES) and set(tokens) & set(COLORS)
        positions = [t for t in tokens if t in ANCHORS or t == "middle"]
        if "two" in tokens or len(positions) != 1 or "and" in tokens:
            continue  # only single-shape captions have one unambiguous position
        color = next(t for t in tokens if t in COLORS)
        position = "center" if positions[0] == "middle" else positions[0]
        with Image.open(synth_coco / "images" / "train" / files[annotation["image_id"]]) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.int32)
        x, y = ANCHORS[position]
        center = pixels[int(y * (pixels.shape[0] - 1)), int(x * (pixels.shape[1] - 1))]
        assert np.abs(center - np.array(COLORS[color])).max() < 60, annotation["caption"]
        checked += 1
    assert checked >= 20


def test_karpathy_file(synth_coco):
    data = json.loads((synth_coco / "dataset_coco.json").read_text())
    assert len(data["images"]) == 44
    assert {image["split"] for image in data["images"]} == {"train", "restval", "val", "test"}
    for image in data["images"]:
        assert (synth_coco / "images" / image["filepath"] / image["filename"]).is_file()
        assert image["filepath"] in ("train", "val") and isinstance(image["cocoid"], int)
        assert len(image["sentences"]) == 5
        assert all(s["tokens"] == tokenize(s["raw"]) for s in image["sentences"])
    assert len({image["imgid"] for image in data["images"]}) == 44


def test_textured_images_are_deterministic_and_convert_to_photo_sized_jpegs(tmp_path):
    """--textured exists for loader benchmarks: at 256² q90 its JPEGs must weigh like COCO photos (>= 15 KB)."""
    from capfast.pack.convert import convert
    from capfast.store.beton import BetonContents

    a = make_synthetic_coco(tmp_path / "a", n_train=8, n_val=0, seed=3, texture=True)
    b = make_synthetic_coco(tmp_path / "b", n_train=8, n_val=0, seed=3, texture=True)
    assert all_files(a) == all_files(b)
    convert(tmp_path / "data", "train", annotations=a / "annotations" / "captions_train.json",
            images=a / "images" / "train", image_size=256, min_count=1, workers=1, progress=False)
    assert BetonContents(tmp_path / "data" / "train.beton").image_nbytes().mean() >= 15 * 1024


def test_cli(tmp_path, capfast_cli):
    result = capfast_cli("synth", tmp_path / "s", "--train", 3, "--val", 2, "--seed", 1)
    assert result.code == 0, result.stderr
    assert len(list((tmp_path / "s" / "images" / "train").glob("*.jpg"))) == 3
    assert not (tmp_path / "s" / "dataset_coco.json").exists()


def test_attributes_record_what_each_caption_names(synth_coco):
    """attributes_SPLIT.json holds every image's shapes; parsed, each reference caption names their colours and
    kinds, and their positions whenever it names positions at all."""
    from capfast.eval.attributes import image_correct, load_attributes, mentions

    for split in ("train", "val"):
        coco = json.loads((synth_coco / "annotations" / f"captions_{split}.json").read_text())
        attributes = load_attributes(synth_coco / "annotations" / f"attributes_{split}.json")
        assert set(attributes) == {image["id"] for image in coco["images"]}
        positioned = 0
        for annotation in coco["annotations"]:
            named = mentions(annotation["caption"])
            correct = image_correct(named, attributes[annotation["image_id"]])
            assert correct["color"] and correct["shape"], annotation["caption"]
            if all(m["position"] for m in named):
                assert correct["position"], annotation["caption"]
                positioned += 1
        assert positioned >= 0.6 * len(coco["annotations"])


def test_convert_carries_the_attributes_of_the_written_images(converted):
    for split in ("train", "val"):
        refs = json.loads((converted / f"refs_{split}.json").read_text())
        attributes = json.loads((converted / f"attributes_{split}.json").read_text())
        assert set(attributes) == set(refs)
        assert all(scene["shapes"] for scene in attributes.values())


def test_each_image_shows_the_colours_its_attributes_record(converted):
    """What attribute accuracy is scored against must be what the model sees: through convert and the loader, the
    pixel at each recorded shape's anchor has (nearest among the palette) the recorded colour, for the image of
    the id the loader reports."""
    import torch

    from capfast.common.normalization import IMAGENET
    from capfast.data import LoaderOptions, build_loader
    from capfast.eval.attributes import load_attributes
    from capfast.eval.evaluate import _denormalize
    from capfast.pack.synth import ANCHORS, BACKGROUNDS, COLORS

    palette = {**COLORS, **BACKGROUNDS}
    rgb = torch.tensor(list(palette.values()), dtype=torch.float32)
    attributes = load_attributes(converted / "attributes_val.json")
    loader = build_loader(converted / "val.beton", LoaderOptions(batch_size=8, image_size=64), train=False,
                          device=torch.device("cpu"), normalization=IMAGENET)
    checked = right = 0
    for batch in loader.epoch(0):
        for image, image_id in zip(_denormalize(batch.images, IMAGENET) * 255, batch.image_ids.tolist()):
            for shape in attributes[image_id]:
                x, y = (int(f * 64) for f in ANCHORS[shape["position"]])
                nearest = (rgb - image[:, y, x]).norm(dim=1).argmin()
                right += list(palette)[nearest] == shape["color"]
                checked += 1
    assert checked >= len(attributes) and right >= 0.9 * checked


def test_square_images_with_larger_shapes_as_the_demo_draws_them(tmp_path):
    """`--square --shape-sizes`: every image square, and each shape's painted extent the requested fraction of the
    side (a square shape fills exactly that box)."""
    root = make_synthetic_coco(tmp_path / "s", n_train=24, n_val=0, seed=2, square=True, shape_sizes=(0.3, 0.45))
    data = json.loads((root / "annotations" / "captions_train.json").read_text())
    attributes = json.loads((root / "annotations" / "attributes_train.json").read_text())
    measured = 0
    for image in data["images"]:
        assert image["width"] == image["height"]
        shapes = attributes[str(image["id"])]["shapes"]
        if len(shapes) != 1 or shapes[0]["kind"] != "square" or attributes[str(image["id"])]["gradient_to"]:
            continue
        with Image.open(root / "images" / "train" / image["file_name"]) as img:
            pixels = np.asarray(img.convert("RGB")).astype(int)
        painted = np.abs(pixels - COLORS[shapes[0]["color"]]).sum(axis=2) < 60
        extent = painted.any(axis=0).sum() / image["width"]
        assert abs(extent - {"small": 0.3, "large": 0.45}[shapes[0]["size"]]) < 0.04, (image, extent)
        measured += 1
    assert measured >= 2


def test_shape_sizes_that_would_overlap_are_refused(tmp_path, capfast_cli):
    result = capfast_cli("synth", tmp_path / "s", "--train", 1, "--val", 0, "--shape-sizes", 0.3, 0.6)
    assert result.code != 0 and "Traceback" not in result.stderr
    assert "shape sizes must be 0 < small <= large <= 0.5" in result.stderr
