"""What `capfast train --resume` may change in the config.

A resumed run continues exactly where the checkpoint stopped: the same records in the same order, the same crops,
the same model. Keys that would change what the checkpoint's position (epoch, batch in epoch) or weights mean are
refused. The keys listed as applied are applied, and the change is recorded (checkpoint, config.json) and printed:

  refused  model.* (architecture, BatchNorm mode), objective, scst.* (the sampler's draws), data.train_split,
           data.image_size, data.batch_size, data.order, data.crop_scale, data.crop_ratio, data.color_jitter,
           data.features, seed, optim.grad_accum, precision, encoder_trainable_from_epoch, and the number of
           processes when resuming mid-epoch
  applied  epochs and max_steps (the cosine schedule is stretched from the current step on), optimizer settings
           (lr, encoder_lr, weight_decay, betas, warmup, clipping, label smoothing: set on the restored optimizer),
           eval.* (eval.patience too: validations.json counts the validations since the best), data.val_split,
           data.workers, data.os_cache, data.prefetch, data.verify (it only checks what is read), logging,
           progress_seconds, checkpoint_every, compile, channels_last, device, keep_last, stop_signals,
           dist_timeout_s, nonfinite_skips, init_from (only read when a run starts)

Every config key is in exactly one of the two lists (tests/test_config.py checks it); a key in neither is refused,
so a new key is safe to resume across only once someone has said so here.
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
    """The config changes from the checkpoint `before` (read from `path`) to the resumed run `now`, once the
    data, the refused keys and the number of processes are checked."""
    check_same_data(path, before.data, now.data)
    changes = config_changes(before.config, now.config)
    check_resumable(path, changes, before.world_size, now.world_size, mid_epoch=before.mid_epoch)
    return changes


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


def check_resumable(path, changes: dict, old_world: int, new_world: int, mid_epoch: bool) -> None:
    """CapfastError naming every refused change with both values; returns when all changes may apply."""
    refused = [f"{key} {show(a)} -> {show(b)}" for key, (a, b) in changes.items() if not is_safe(key)]
    if mid_epoch and old_world != new_world:
        refused.append(f"processes {old_world} -> {new_world} (mid-epoch)")
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
