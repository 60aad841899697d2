"""TensorBoard's Custom Scalars layout and HParams entry for a training run (written on rank 0 only).

The layout groups the per-step scalars into the charts that answer "how fast?", "is the GPU waiting for
data?" and "is it learning?"; the HParams entry puts the run's config beside its validation metrics, so runs
of one log directory line up in the HParams tab.
"""

import re

# Category -> chart -> scalar tags. The Custom Scalars tab shows the categories in this order.
LAYOUT = {
    "Throughput": {
        "images/s (all ranks)": ["perf/images_per_sec"],
        "step time (ms)": ["perf/step_time_ms", "perf/step_time_slowest_ms"],
    },
    "Data wait": {
        "data wait (ms)": ["perf/data_wait_ms", "perf/data_wait_slowest_ms"],
        "data wait (% of step)": ["perf/data_wait_pct", "perf/data_wait_slowest_pct"],
        "batches ready when a step asks": ["perf/ready_batches"],
    },
    "Loss": {
        "train loss": ["train/loss"],
        "val CIDEr": ["val/CIDEr", "best/CIDEr"],
        "val BLEU-4": ["val/BLEU-4", "best/BLEU-4"],
        # synthetic data only (capfast/eval/attributes.py): does a caption name what the image shows?
        "attributes named right": ["val/accuracy/color", "val/accuracy/shape", "val/accuracy/position"],
    },
    "SCST": {  # objective = "scst" only
        "reward (CIDEr-D) and baseline": ["scst/reward", "scst/baseline"],
        "advantage": ["scst/advantage", "scst/advantage_std"],
        "sample length (words)": ["scst/sample_len"],
        "entropy (nats/token)": ["scst/entropy"],
        "reward time (ms/step)": ["scst/reward_ms"],
    },
}
# Columns of the HParams table: the last value of each tag (best/* are the metrics of best.pt).
HPARAM_METRICS = ["val/CIDEr", "val/BLEU-4", "best/CIDEr", "best/BLEU-4", "train/loss"]


def write_layout(writer, objective: str = "xe") -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    categories = []
    for title, charts in LAYOUT.items():
        if title == "SCST" and objective != "scst":
            continue
        chart_protos = [layout_pb2.Chart(title=name, multiline=layout_pb2.MultilineChartContent(
            tag=[f"^{re.escape(tag)}$" for tag in tags])) for name, tags in charts.items()]
        categories.append(layout_pb2.Category(title=title, chart=chart_protos))
    layout = layout_pb2.Layout(category=categories).SerializeToString()
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout], tensor_shape=TensorShapeProto())
    value = Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=metadata.create_summary_metadata())
    writer.file_writer.add_summary(Summary(value=[value]))


def hparams(config: dict) -> dict:
    """The config flattened to section.key -> bool, number or string (what the HParams plugin can show)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in hparams(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = "none" if value is None else str(list(value) if isinstance(value, tuple) else value)
    return flat


def write_session_start(writer, config: dict) -> None:
    """The experiment (which hparams and metrics exist) and this run's hparam values."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    values = hparams(config)
    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for name, value in values.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value, kind = value, "DATA_TYPE_FLOAT64"
        else:
            start.hparams[name].string_value, kind = value, "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS])
    _write_hparams_data(writer, "experiment", plugin_data_pb2.HParamsPluginData(experiment=experiment))
    _write_hparams_data(writer, "session_start_info", plugin_data_pb2.HParamsPluginData(session_start_info=start))


def write_session_end(writer, succeeded: bool) -> None:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    status = api_pb2.Status.Value("STATUS_SUCCESS" if succeeded else "STATUS_FAILURE")
    data = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status))
    _write_hparams_data(writer, "session_end_info", data)


def _write_hparams_data(writer, name: str, data) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    data.version = metadata.PLUGIN_DATA_VERSION
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    summary = Summary(value=[Summary.Value(tag=f"_hparams_/{name}", metadata=SummaryMetadata(plugin_data=plugin))])
    writer.file_writer.add_summary(summary)
