"""The convert and train benchmarks run end to end and end with their machine-readable line."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^capfast_img_s=[\d.]+ baseline_img_s=[\d.]+ ratio=[\d.]+$")
CONVERT_LAST_LINE = re.compile(r"^capfast_img_s=[\d.]+ baseline_img_s=[\d.]+ ratio=[\d.]+ "
                               r"ffcv_img_s=[\d.]+ ffcv_ratio=[\d.]+$")


def assert_ratio_is_capfast_over_baseline(line: str) -> None:
    values = {k: float(v) for k, v in (pair.split("=") for pair in line.split())}
    assert values["capfast_img_s"] > 0 and values["baseline_img_s"] > 0, line
    assert values["ratio"] == pytest.approx(values["capfast_img_s"] / values["baseline_img_s"], rel=0.03, abs=0.01)


def test_bench_convert(capfast_cli):
    result = capfast_cli("bench", "convert", "--images", "12", "--workers", "1", "--rounds", "1")
    assert result.code == 0, result.stderr
    assert CONVERT_LAST_LINE.match(result.stdout.strip().splitlines()[-1]), result.stdout
    assert_ratio_is_capfast_over_baseline(result.stdout.strip().splitlines()[-1])


def test_bench_train_reports_loader_efficiency(converted, capfast_cli):
    result = capfast_cli("bench", "train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                         "--steps", "2", "--warmup", "1", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                         "data.image_size=32", "data.batch_size=8", "data.workers=1")
    assert result.code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "efficiency" in lines[0]
    assert LAST_LINE.match(lines[-1]), result.stdout
    assert_ratio_is_capfast_over_baseline(lines[-1])


def test_bench_tokenize_agrees_with_its_baseline(capfast_cli):
    result = capfast_cli("bench", "tokenize", "--captions", "200")
    assert result.code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.match(r"^capfast_captions_s=\d+ baseline_captions_s=\d+ ratio=[\d.]+$", lines[-1]), result.stdout
    if "Java" in result.stdout:
        assert "same tokens for 100.0% of the captions" in result.stdout


def test_bench_verify_times_inspect_verify_against_a_plain_read(converted, capfast_cli, tmp_path):
    result = capfast_cli("bench", "verify", "--data", converted / "val.beton", "--repeat", "3", "--cold",
                         "--work-dir", tmp_path)
    assert result.code == 0, result.stderr
    values = dict(pair.split("=") for pair in result.stdout.strip().splitlines()[-1].split())
    assert values["records"] == "36" and values["cache"] == "cold" and float(values["read_mb_s"]) > 0
    assert float(values["ratio"]) == pytest.approx(float(values["verify_mb_s"]) / float(values["read_mb_s"]),
                                                   rel=0.01, abs=0.001)
    assert list(tmp_path.iterdir()) == []  # the repeated beton is gone
