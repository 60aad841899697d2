"""The convert and train benchmarks run end to end and end with their machine-readable line."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^capfast_img_s=[\d.]+ baseline_img_s=[\d.]+ ratio=[\d.]+$")
CONVERT_LAST_LINE = re.compile(r"^capfast_img_s=[\d.]+ baseline_img_s=[\d.]+ ratio=[\d.]+ "
                               r"ffcv_img_s=[\d.]+ ffcv_ratio=[\d.]+$")


def test_bench_convert(capfast_cli):
    result = capfast_cli("bench", "convert", "--images", "12", "--workers", "1", "--rounds", "1")
    assert result.code == 0, result.stderr
    assert CONVERT_LAST_LINE.match(result.stdout.strip().splitlines()[-1]), result.stdout


def test_bench_train_reports_loader_efficiency(converted, capfast_cli):
    result = capfast_cli("bench", "train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                         "--steps", "2", "--warmup", "1", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                         "data.image_size=32", "data.batch_size=8", "data.workers=1")
    assert result.code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "efficiency" in lines[0]
    assert LAST_LINE.match(lines[-1]), result.stdout
