"""Karpathy split files in both layouts: dataset_coco.json (cocoid, filepath) and dataset_flickr8k/30k.json
(imgid only, images directly in the image root)."""

import json

import pytest
from PIL import Image

from capfast.converters import read_karpathy
from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.beton import BetonContents

# Flickr30k-style file names; imgid is the index in the file, as in Karpathy's files.
FLICKR30K = [("1000092795.jpg", "train"), ("10002456.jpg", "train"), ("1000268201.jpg", "train"),
             ("1000344755.jpg", "val"), ("1000366164.jpg", "val"), ("1000523639.jpg", "test"),
             ("1000919630.jpg", "test")]
FLICKR8K = [("1000268201_693b08cb0e.jpg", "train"), ("1001773457_577c3a7d70.jpg", "val"),
            ("1002674143_1b742ab4b8.jpg", "test")]


def raw_captions(filename: str) -> list[str]:
    return [f"picture {filename.split('.')[0]} shows a dog number {k}" for k in range(5)]


def flickr_json(path, images, dataset: str):
    """images: [(filename, split)] -> a Karpathy file in the Flickr layout (no cocoid, no filepath)."""
    rows = []
    for imgid, (filename, split) in enumerate(images):
        sentids = list(range(5 * imgid, 5 * imgid + 5))
        found = [{"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": sentid}
                 for raw, sentid in zip(raw_captions(filename), sentids)]
        rows.append({"filename": filename, "imgid": imgid, "split": split, "sentences": found, "sentids": sentids})
    path.write_text(json.dumps({"images": rows, "dataset": dataset}))
    return path


def tiny_jpegs(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        Image.new("RGB", (12, 8), (30 * n, 200 - 20 * n, 90)).save(folder / name, quality=90)
    return folder


def expected_refs(images, split: str) -> dict[str, list[str]]:
    return {str(imgid): raw_captions(filename) for imgid, (filename, name) in enumerate(images) if name == split}


# ---- Flickr layout ----------------------------------------------------------------------------------------

def test_flickr30k_layout_converts_end_to_end(capfast_cli, tmp_path):
    root = tiny_jpegs(tmp_path / "flickr30k-images", [name for name, _ in FLICKR30K])
    dataset = flickr_json(tmp_path / "dataset_flickr30k.json", FLICKR30K, "flickr30k")
    out = tmp_path / "out"
    result = capfast_cli("convert", "--karpathy", dataset, "--images", root, "--out", out, "--image-size", 16,
                         "--min-count", 1, "--workers", 1)
    assert result.code == 0, result.stderr
    meta = json.loads((out / schema.META_FILE).read_text())
    for split in ("train", "val", "test"):
        refs = expected_refs(FLICKR30K, split)
        assert json.loads(schema.refs_path(out, split).read_text()) == refs
        contents = BetonContents(schema.beton_path(out, split))
        assert contents.image_ids.tolist() == sorted(map(int, refs))
        assert contents.ncaptions.tolist() == [5] * len(refs)
        assert meta["splits"][split]["skipped"] == []
        assert meta["splits"][split]["source"]["format"] == "karpathy"
        assert meta["splits"][split]["source"]["layout"] == "flickr"


def test_flickr8k_layout_reads(tmp_path):
    dataset = flickr_json(tmp_path / "dataset_flickr8k.json", FLICKR8K, "flickr8k")
    root = tiny_jpegs(tmp_path / "Flicker8k_Dataset", [name for name, _ in FLICKR8K])
    source = read_karpathy(dataset, root)
    assert source.description["layout"] == "flickr"
    for imgid, (filename, split) in enumerate(FLICKR8K):
        (item,) = source.items[split]
        assert (item.image_id, item.path) == (imgid, root / filename)
        assert item.captions == expected_refs(FLICKR8K, split)[str(imgid)]
    assert all(problems == [] for problems in source.problems.values())


def test_flickr_duplicate_imgid_is_a_problem(tmp_path):
    dataset = flickr_json(tmp_path / "k.json", [("a.jpg", "train"), ("b.jpg", "train")], "flickr8k")
    data = json.loads(dataset.read_text())
    data["images"][1]["imgid"] = 0
    dataset.write_text(json.dumps(data))
    source = read_karpathy(dataset, tmp_path, ["train"])
    assert [item.path.name for item in source.items["train"]] == ["a.jpg"]
    assert [problem.reason for problem in source.problems["train"]] == ["duplicate imgid (later entry ignored)"]


# ---- COCO layout ------------------------------------------------------------------------------------------

def test_coco_layout_uses_cocoid_and_filepath(tmp_path):
    rows = [{"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0, "cocoid": 42,
             "split": "restval", "sentences": [{"raw": "a cat", "tokens": ["a", "cat"]}]},
            {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "imgid": 1, "cocoid": 7,
             "split": "train", "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]}]
    dataset = tmp_path / "dataset_coco.json"
    dataset.write_text(json.dumps({"images": rows, "dataset": "coco"}))
    source = read_karpathy(dataset, tmp_path, ["train"])
    assert source.description["layout"] == "coco"
    assert [(item.image_id, item.path, item.captions) for item in source.items["train"]] == [
        (7, tmp_path / "train2014" / "COCO_train2014_000000000007.jpg", ["a dog"]),
        (42, tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", ["a cat"])]


def test_synthetic_coco_file_still_reads(synth_coco):
    data = json.loads((synth_coco / "dataset_coco.json").read_text())
    source = read_karpathy(synth_coco / "dataset_coco.json", synth_coco / "images")
    assert source.description["layout"] == "coco"
    expected = sorted((row["cocoid"], synth_coco / "images" / row["filepath"] / row["filename"])
                      for row in data["images"] if row["split"] == "test")
    assert [(item.image_id, item.path) for item in source.items["test"]] == expected


# ---- bad input --------------------------------------------------------------------------------------------

def coco_row(**changes) -> dict:
    row = {"filepath": "train2014", "filename": "x.jpg", "imgid": 0, "cocoid": 5, "split": "train",
           "sentences": [{"raw": "a dog"}]}
    return {k: v for k, v in {**row, **changes}.items() if v is not None}


def flickr_row(**changes) -> dict:
    row = {"filename": "1.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "a dog"}], "sentids": [0]}
    return {k: v for k, v in {**row, **changes}.items() if v is not None}


BAD_FILES = {
    # name: (images, expected message)
    "flickr row in a coco file": ([coco_row(), coco_row(cocoid=None, imgid=1)],
                                  "images[1] has an imgid and no cocoid (Flickr layout) but images[0] has a cocoid "
                                  "(COCO layout); use one layout per file"),
    "coco row in a flickr file": ([flickr_row(), flickr_row(imgid=1, cocoid=9)],
                                  "images[1] has a cocoid (COCO layout) but images[0] has an imgid and no cocoid "
                                  "(Flickr layout); use one layout per file"),
    "no id in a coco file": ([coco_row(), coco_row(cocoid=None, imgid=None)],
                             "images[1] lacks filepath/filename/cocoid/split/sentences of the expected types"),
    "no id in a flickr file": ([flickr_row(), flickr_row(imgid=None)],
                               "images[1] lacks filename/imgid/split/sentences of the expected types"),
    "no id in the first image": ([flickr_row(imgid=None), flickr_row()],
                                 "images[0] lacks filepath/filename/cocoid/split/sentences of the expected types"),
    "flickr imgid not an integer": ([flickr_row(imgid="7")],
                                    "images[0] lacks filename/imgid/split/sentences of the expected types"),
    "flickr unknown split": ([flickr_row(split="dev")], "images[0] has unknown split 'dev'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_one_line(case, tmp_path):
    images, expected = BAD_FILES[case]
    dataset = tmp_path / "k.json"
    dataset.write_text(json.dumps({"images": images}))
    with pytest.raises(CapfastError) as raised:
        read_karpathy(dataset, tmp_path)
    assert str(raised.value) == f"Karpathy split file {dataset}: {expected}"


def test_mixed_layouts_fail_in_one_line_on_the_cli(capfast_cli, tmp_path):
    dataset = tmp_path / "k.json"
    dataset.write_text(json.dumps({"images": [flickr_row(), flickr_row(imgid=1, cocoid=9)]}))
    result = capfast_cli("convert", "--karpathy", dataset, "--images", tmp_path, "--out", tmp_path / "out",
                         "--workers", 1)
    lines = [line for line in result.stderr.splitlines() if line.startswith("capfast: error:")]
    assert result.code == 2 and len(lines) == 1 and "use one layout per file" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
