"""Watching a run: console progress on stdout, every step's perf scalars, and the Custom Scalars layout and
HParams entry read back from the event files. One short `capfast train` run serves every test here."""

import contextlib
import re
from pathlib import Path

import pytest
from test_train import SHALLOW

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 32 train images, batch 8
OVERRIDES = [*SHALLOW, f"epochs={EPOCHS}", "progress_seconds=0", "eval.every_epochs=1", "eval.beam_size=2"]
STEP_LINE = re.compile(r"^train epoch (\d+)/2  step (\d+)/8  loss \d+\.\d{4}  [\d,]+\.\d img/s  "
                       r"data wait \d+\.\d%  ETA \d+:\d\d:\d\d$")


@pytest.fixture(scope="module")
def watched_run(converted, tmp_path_factory):
    """(run dir, stdout lines) of `capfast train` with stdout redirected to a file, as in `... > train.log`."""
    from capfast.cli import main

    root = tmp_path_factory.mktemp("watched")
    log = root / "stdout.log"
    with open(log, "w") as stdout, contextlib.redirect_stdout(stdout):
        main(["train", "--config", str(ROOT / "configs" / "cpu_smoke.toml"), "--data", str(converted),
              "--out", str(root / "run"), *OVERRIDES])
    return root / "run", log.read_text().splitlines()


def event_accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "tb").glob("events.*")  # a fresh run writes one file
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def line_starting(lines: list[str], prefix: str) -> int:
    found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


def test_a_progress_line_for_every_step_before_the_epoch_line(watched_run):
    _, lines = watched_run
    for epoch in range(1, EPOCHS + 1):
        summary = line_starting(lines, f"epoch {epoch}/2 train: loss ")
        steps = [int(m[2]) for m in map(STEP_LINE.match, lines[:summary]) if m and int(m[1]) == epoch]
        assert steps == list(range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1)), lines
        val = line_starting(lines, f"epoch {epoch}/2 val: BLEU-1 ")
        assert val > summary
        assert any(re.match(r"^val  batch \d+/\d+  ETA ", line) for line in lines[summary:val]), lines
    assert lines[-1].startswith("done: 8 steps, 2 epochs")


def test_every_step_logs_data_wait_share_and_throughput(watched_run, tb_scalars):
    scalars = tb_scalars(watched_run[0])
    steps = list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for tag in ("train/loss", "perf/images_per_sec", "perf/step_time_ms", "perf/data_wait_ms", "perf/data_wait_pct"):
        assert sorted(scalars[tag]) == steps, tag
    for step in steps:
        expected = min(100.0, 100 * scalars["perf/data_wait_ms"][step] / scalars["perf/step_time_ms"][step])
        assert scalars["perf/data_wait_pct"][step] == pytest.approx(expected, rel=1e-4)
        assert scalars["perf/images_per_sec"][step] == pytest.approx(8 / scalars["perf/step_time_ms"][step] * 1e3,
                                                                      rel=1e-4)


def test_custom_scalars_layout_charts_the_logged_tags(watched_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = event_accumulator(watched_run[0])
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["Throughput", "Data wait", "Loss"]
    logged = acc.Tags()["scalars"]
    charted = {tag for c in layout.category for chart in c.chart for regex in chart.multiline.tag
               for tag in logged if re.match(regex, tag)}
    assert {"perf/images_per_sec", "perf/data_wait_ms", "perf/data_wait_pct", "train/loss", "val/CIDEr",
            "val/BLEU-4", "best/CIDEr"} <= charted
    data_wait = next(c for c in layout.category if c.title == "Data wait")
    waits = {t for chart in data_wait.chart for r in chart.multiline.tag for t in logged if re.match(r, t)}
    assert {"perf/data_wait_ms", "perf/data_wait_pct"} <= waits
    assert not any("slowest" in t for t in waits)  # single process: no slowest-rank series
    assert set(logged) <= charted | {"train/lr", "perf/gpu_mem_gb", "val/BLEU-1", "val/BLEU-2", "val/BLEU-3",
                                     "val/ROUGE-L", "best/BLEU-1", "best/BLEU-2", "best/BLEU-3", "best/ROUGE-L",
                                     "best/accuracy/color", "best/accuracy/shape", "best/accuracy/position"}
    assert "val/accuracy/color" in charted  # synthetic data: the attribute accuracy of capfast/eval/attributes.py


def test_hparams_entry_holds_the_config_and_its_metrics(watched_run, tb_scalars):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    acc = event_accumulator(watched_run[0])
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.d_model"].number_value == 32
    assert start.hparams["progress_seconds"].number_value == 0
    assert start.hparams["precision"].string_value == "fp32"
    assert start.hparams["channels_last"].bool_value is True
    assert start.hparams["data.crop_scale"].string_value == "[0.8, 1.0]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {h.name for h in experiment.hparam_infos} == set(start.hparams)
    metrics = [m.name.tag for m in experiment.metric_infos]
    scalars = tb_scalars(watched_run[0])
    assert {"val/CIDEr", "best/CIDEr", "val/BLEU-4"} <= set(metrics) <= set(scalars)
    assert sorted(scalars["val/CIDEr"]) == [4, 8]
    assert scalars["best/CIDEr"][max(scalars["best/CIDEr"])] == max(scalars["val/CIDEr"].values())
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")
