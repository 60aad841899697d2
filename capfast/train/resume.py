"""What `capfast train --resume` may change in the config, and in the number of processes.

A resumed run continues exactly where the checkpoint stopped: the same records in the same order, the same crops,
the same model. Keys that would change what the checkpoint's position (epoch, batch in epoch) or weights mean are
refused. The keys listed as applied are applied, and the change is recorded (checkpoint, config.json) and printed:

  refused  model.* (architecture, BatchNorm mode), objective, scst.* (the sampler's draws), data.train_split,
           data.image_size, data.batch_size, data.order, data.crop_scale, data.crop_ratio, data.color_jitter,
           data.features, seed, optim.grad_accum, precision, encoder_trainable_from_epoch
  applied  epochs and max_steps (the cosine schedule is stretched from the current step on), optimizer settings
           (lr, encoder_lr, weight_decay, betas, warmup, clipping, label smoothing: set on the restored optimizer),
           eval.* (eval.patience too: validations.json counts the validations since the best), data.val_split,
           data.workers, data.os_cache, data.prefetch, data.verify (it only checks what is read), logging,
           progress_seconds, checkpoint_every, compile, channels_last, device, keep_last, stop_signals,
           dist_timeout_s, nonfinite_skips, init_from (only read when a run starts)

Every config key is in exactly one of the two lists (tests/test_config.py checks it); a key in neither is refused,
so a new key is safe to resume across only once someone has said so here.

The number of processes may change too (a node lost or added), recorded as "processes": an epoch's global order
and each global batch's records and crops are the same for any number of processes that splits data.batch_size
(capfast/data/order.py), so the position carries over, mid-epoch included. What does not carry over: each rank's
random generators (dropout's masks, SCST's samples) start again from their seeds, and the gradient is the same
only up to float summation order (with model.batchnorm = "batch", each rank's statistics differ too).
data.order = "quasi_random" shuffles within a window of each rank's batch, so its order changes with the number
of processes: that change is refused mid-epoch.
"""

from capfast.errors import CapfastError
from capfast.models import checkpoint
from capfast.models.record import ModelRecord
from capfast.train.state import TrainState

FIXED_PREFIXES = ("model.", "scst.")
FIXED_KEYS = ("data.train_split", "data.image_size", "data.batch_size", "data.order", "data.crop_scale",
              "data.crop_ratio", "data.color_jitter", "data.features", "seed", "optim.grad_accum", "precision",
              "encoder_trainable_from_epoch", "objective")
SAFE_PREFIXES = ("eval.",)
SAFE_KEYS = ("epochs", "max_steps", "optim.lr", "optim.encoder_lr", "optim.weight_decay", "optim.betas",
             "optim.warmup_steps", "optim.min_lr_ratio", "optim.grad_clip", "optim.label_smoothing",
             "data.val_split", "data.workers", "data.os_cache", "data.prefetch",
             "data.verify",  # checks the records read against their checksums; reads and yields the same batches
             "log_every", "progress_seconds",
             "checkpoint_every", "compile", "channels_last", "device", "keep_last", "stop_signals",
             "dist_timeout_s", "nonfinite_skips",
             "init_from")  # read only when a run starts; a resumed run's weights come from last.pt


def model_config(saved: dict, path, configured):
    """The model config a resumed run trains: its checkpoint's when the run started from init_from (which chose
    the architecture; init_from is not read again), else `configured` (a change to it is refused with the others)."""
    if saved["version"] != checkpoint.VERSION:
        raise CapfastError(f"cannot resume from {path}: it is checkpoint version {saved['version']}, and this capfast "
                           f"resumes version {checkpoint.VERSION} only; start a new run from it with init_from={path}")
    before = TrainState.from_state_dict(saved["train"], path)
    if before.config.get("init_from"):
        return ModelRecord.from_state_dict(saved["model"], f"checkpoint {path}").config
    return configured


def check(path, before: TrainState, now: TrainState) -> dict[str, tuple]:
    """The changes from the checkpoint `before` (read from `path`) to the resumed run `now`, config keys and
    "processes", once the data, the refused keys and the number of processes are checked."""
    check_same_data(path, before.data, now.data)
    changes = config_changes(before.config, now.config)
    check_resumable(path, changes, processes_refusal(before, now))
    if before.world_size != now.world_size:
        changes["processes"] = (before.world_size, now.world_size)
    return changes


def processes_refusal(before: TrainState, now: TrainState) -> str | None:
    """Why the change in the number of processes cannot continue the run exactly, or None."""
    order = flatten(before.config).get("data.order")
    if before.world_size == now.world_size or not before.mid_epoch or order != "quasi_random":
        return None
    return (f"processes {before.world_size} -> {now.world_size} mid-epoch under data.order \"quasi_random\" (its "
            f"order depends on each rank's batch; at an epoch's end it may change)")


def flatten(config: dict, prefix: str = "") -> dict:
    """{"data": {"batch_size": 8}} -> {"data.batch_size": 8}; tuples become lists, as in the JSON of a run."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for the keys whose value differs. Keys the old config lacks (added to
    capfast after it was written) keep their defaults and are not reported."""
    old, new = flatten(old), flatten(new)
    return {key: (old[key], new[key]) for key in new if key in old and old[key] != new[key]}


def is_fixed(key: str) -> bool:
    return key in FIXED_KEYS or key.startswith(FIXED_PREFIXES)


def is_safe(key: str) -> bool:
    return key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)


def check_resumable(path, changes: dict, processes: str | None) -> None:
    """CapfastError naming every refused change with both values (`processes`: the refusal of a change in the
    number of processes, or None); returns when all changes may apply."""
    refused = [f"{key} {show(a)} -> {show(b)}" for key, (a, b) in changes.items() if not is_safe(key)]
    if processes:
        refused.append(processes)
    if refused:
        raise CapfastError(f"cannot resume from {path}: {', '.join(refused)} would not continue the run exactly "
                           f"(keep the checkpoint's values, or start a new run with --out)")


def check_same_data(path, recorded: dict, current: dict) -> None:
    """The checkpoint's data fingerprint (store.beton.data_fingerprint) must be this run's: else "exact" fails."""
    if recorded != current:
        differences = ", ".join(f"{key} {recorded.get(key)} -> {current[key]}" for key in current
                                if recorded.get(key) != current[key])
        raise CapfastError(f"cannot resume from {path}: the training data changed since ({differences}), so "
                           f"the run would not continue exactly; start a new run with another --out")


def as_lists(changes: dict) -> dict:
    """{key: [old, new]}: how config.json and the checkpoints record a resume's changes."""
    return {key: list(values) for key, values in changes.items()}


def describe(changes: dict) -> str:
    return ", ".join(f"{key} {show(a)} -> {show(b)}" for key, (a, b) in changes.items())


def show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
