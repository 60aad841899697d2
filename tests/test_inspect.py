import json
import shutil

import numpy as np
import pytest

from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.beton import BetonContents, check_beton, describe_beton
from capfast.store.vocab import Vocab


def test_describe_converted_beton(converted):
    info = describe_beton(converted / "train.beton")
    assert info["records"] == 32
    assert info["fields"] == {"image": "RGBImageField", "captions": "NDArrayField", "ncaptions": "IntField",
                              "image_id": "IntField"}
    assert info["vocab_size"] == len(Vocab.load(converted / "vocab.json"))
    assert (info["captions_per_image"], info["max_len"], info["captions"]) == (5, 16, 160)
    assert 3 <= info["caption_tokens"]["min"] <= info["caption_tokens"]["mean"] <= info["caption_tokens"]["max"] <= 16
    assert info["image_width"] == info["image_height"] == {"min": 64, "mean": 64.0, "max": 64}
    example = info["examples"][0]
    assert len(example["captions"]) == 5 and all(isinstance(c, str) and c for c in example["captions"])
    json.dumps(info)  # serializable


def test_check_beton_returns_reader(converted):
    reader = check_beton(converted / "val.beton")
    assert reader.num_samples == 12 and list(reader.field_names) == list(schema.FIELD_NAMES)


def test_cli_text_and_json(converted, capfast_cli):
    text = capfast_cli("inspect", converted / "train.beton")
    assert text.code == 0 and "32 records" in text.stdout and "tokens per caption" in text.stdout
    as_json = capfast_cli("inspect", converted / "val.beton", "--json")
    info = json.loads(as_json.stdout)
    assert as_json.code == 0 and info["records"] == 12 and info["vocab_size"] > 4


def test_beton_without_vocab_beside_it(converted, tmp_path):
    shutil.copy(converted / "val.beton", tmp_path / "val.beton")
    info = describe_beton(tmp_path / "val.beton")
    assert info["vocab_size"] is None and info["records"] == 12


def write_beton(path, fields: dict, sample: tuple):
    from ffcv.writer import DatasetWriter

    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset([sample, sample])
    return path


def foreign_betons(tmp_path):
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    return {
        "missing field": write_beton(tmp_path / "a.beton", {
            "image": RGBImageField(write_mode="jpg"), "captions": NDArrayField(np.dtype("int32"), (2, 4)),
            "image_id": IntField()}, (image, np.zeros((2, 4), np.int32), 1)),
        "captions are int64": write_beton(tmp_path / "b.beton", {
            "image": RGBImageField(write_mode="jpg"), "captions": NDArrayField(np.dtype("int64"), (2, 4)),
            "ncaptions": IntField(), "image_id": IntField()}, (image, np.zeros((2, 4), np.int64), 1, 1)),
    }


def test_rejects_foreign_betons(tmp_path):
    betons = foreign_betons(tmp_path)
    with pytest.raises(CapfastError, match="missing field 'ncaptions'"):
        check_beton(betons["missing field"])
    with pytest.raises(CapfastError, match="incompatible capfast convert version.*int64"):
        check_beton(betons["captions are int64"])


@pytest.mark.parametrize("content, message", [
    (None, "beton not found"),
    (b"", "not a beton"),
    (b'{"format_version": 1}' * 10, "not a beton"),
    (bytes(4096), "not a beton"),
])
def test_rejects_non_betons(tmp_path, content, message):
    path = tmp_path / "x.beton"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CapfastError, match=message):
        check_beton(path)


def test_rejects_other_ffcv_file_version(converted, tmp_path):
    data = bytearray((converted / "val.beton").read_bytes())
    data[0:2] = (1).to_bytes(2, "little")
    (tmp_path / "old.beton").write_bytes(bytes(data))
    with pytest.raises(CapfastError, match="incompatible ffcv version"):
        check_beton(tmp_path / "old.beton")


def test_rejects_other_capfast_format_version(converted, tmp_path):
    shutil.copy(converted / "val.beton", tmp_path / "val.beton")
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 0, "splits": {}}))
    with pytest.raises(CapfastError, match="incompatible capfast convert version"):
        check_beton(tmp_path / "val.beton")


def test_cli_error_is_one_line(tmp_path, capfast_cli):
    (tmp_path / "x.beton").write_text("hello")
    result = capfast_cli("inspect", tmp_path / "x.beton")
    assert result.code == 2 and result.stderr.strip().count("\n") == 0 and "not a beton" in result.stderr


def test_beton_contents_matches_refs(converted):
    contents = BetonContents(converted / "val.beton")
    refs = json.loads((converted / "refs_val.json").read_text())
    assert sorted(refs, key=int) == [str(i) for i in contents.image_ids]
    assert contents.image_bytes(0)[:2] == b"\xff\xd8"
