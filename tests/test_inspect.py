import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.beton import BetonContents, check_beton, describe_beton
from capfast.store.vocab import Vocab


def test_describe_converted_beton(converted):
    info = describe_beton(converted / "train.beton")
    assert info["records"] == 32
    assert info["fields"] == {"image": "RGBImageField", "captions": "NDArrayField", "ncaptions": "IntField",
                              "image_id": "IntField", "checksum": "IntField"}
    assert info["checksums"] is True
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
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1, "splits": {}}))  # before the checksums
    assert check_beton(tmp_path / "val.beton").num_samples == 12


def test_cli_error_is_one_line(tmp_path, capfast_cli):
    (tmp_path / "x.beton").write_text("hello")
    result = capfast_cli("inspect", tmp_path / "x.beton")
    assert result.code == 2 and result.stderr.strip().count("\n") == 0 and "not a beton" in result.stderr


def test_beton_contents_matches_refs(converted):
    contents = BetonContents(converted / "val.beton")
    refs = json.loads((converted / "refs_val.json").read_text())
    assert sorted(refs, key=int) == [str(i) for i in contents.image_ids]
    assert contents.image_bytes(0)[:2] == b"\xff\xd8"


# ---- record checksums and truncation ----------------------------------------------------------------------

def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_passes_a_converted_beton(converted, capfast_cli):
    result = capfast_cli("inspect", converted / "train.beton", "--verify")
    assert result.code == 0, result.stderr
    assert "record checksums: yes" in result.stdout
    assert "verified: all 32 records match their checksums" in result.stdout


def test_verify_names_a_record_whose_jpeg_changed(converted, tmp_path, capfast_cli):
    """A flipped bit inside a JPEG's entropy-coded data decodes without complaint and passes plain inspect."""
    beton = tmp_path / "val.beton"
    shutil.copy(converted / "val.beton", beton)
    contents = BetonContents(beton)
    middle = [int(contents.image_meta["data_ptr"][i]) + len(contents.image_bytes(i)) // 2 for i in (5, 9)]
    image_id = int(contents.image_ids[5])
    flip_byte(beton, middle[0])
    assert capfast_cli("inspect", beton).code == 0
    assert Image.open(io.BytesIO(BetonContents(beton).image_bytes(5))).convert("RGB").size == (64, 64)
    result = capfast_cli("inspect", beton, "--verify")
    assert result.code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"record 5 (image {image_id}) does not match its checksum: " in result.stderr
    flip_byte(beton, middle[1])
    result = capfast_cli("inspect", beton, "--verify", "--json")
    assert f"record 5 (image {image_id}) does not match its checksum, and so do 1 more of its 12 records" \
        in result.stderr and result.stdout == ""


def test_verify_of_a_beton_without_checksums_checks_its_structure(tmp_path, capfast_cli):
    fields = schema.beton_fields(captions_per_image=2, max_len=2, checksums=False)
    sample = (np.zeros((8, 8, 3), np.uint8), np.ones((2, 4), np.int32), 1, 7)
    beton = write_beton(tmp_path / "old.beton", fields, sample)  # ffcv's writer, as capfast before format 2
    result = capfast_cli("inspect", beton, "--verify", "--json")
    assert result.code == 0, result.stderr
    assert "has no record checksums" in result.stderr and "only its structure was checked" in result.stderr
    info = json.loads(result.stdout)
    assert info["checksums"] is False and info["verified"] is None and info["records"] == 2


def test_a_cut_beton_is_truncated(converted, tmp_path, capfast_cli):
    whole = (converted / "val.beton").read_bytes()
    table_start = int(check_beton(converted / "val.beton").header["alloc_table_ptr"])
    beton = tmp_path / "val.beton"
    for kept, expects in [(len(whole) // 2, f"at least {table_start}"), (len(whole) - 10, str(len(whole)))]:
        beton.write_bytes(whole[:kept])
        result = capfast_cli("inspect", beton)
        assert result.code == 2 and f"is truncated ({kept} bytes, its header expects {expects})" in result.stderr
    beton.write_bytes(whole + bytes(24))
    with pytest.raises(CapfastError, match=f"has 24 bytes past its end .*its header expects {len(whole)}"):
        check_beton(beton)
