"""Training configuration: dataclasses, loaded from a TOML recipe and `section.key=value` overrides."""

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from capfast.errors import CapfastError
from capfast.models import ModelConfig


@dataclass
class DataConfig:
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    batch_size: int = 64          # global: split evenly over DDP ranks
    workers: int = 0              # decode threads per rank; 0 = all cores / ranks
    order: str = "random"         # random | quasi_random (datasets larger than RAM)
    os_cache: bool = True
    crop_scale: tuple = (0.35, 1.0)
    color_jitter: float = 0.0
    prefetch: int = 3             # batches a producer thread prepares ahead of training, >= 0 (0 = none: synchronous)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    encoder_lr: float = 1e-4      # used once the encoder is trainable
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01    # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0        # 0 disables
    label_smoothing: float = 0.1
    grad_accum: int = 1


@dataclass
class EvalConfig:
    every_epochs: int = 1         # 0 disables validation during training
    beam_size: int = 3
    max_len: int = 20
    max_images: int = 0           # 0 = the whole validation split
    log_images: int = 4           # images with generated captions shown in TensorBoard


@dataclass
class ScstConfig:
    """Self-critical sequence training (objective = "scst"): reward = CIDEr-D against the training references."""

    samples: int = 5              # sampled captions per image, >= 1 (>= 2 with baseline = "mean")
    baseline: str = "mean"        # mean: of the image's other samples' rewards | greedy: the greedy caption's
    max_len: int = 16             # longest sampled caption in tokens, eos included (1 .. model.max_positions - 1)
    temperature: float = 1.0      # > 0; sampling (and the gradient) use softmax(logits / temperature)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    objective: str = "xe"         # xe: cross-entropy on the references | scst: self-critical (see [scst])
    init_from: str = ""           # checkpoint to start from: its model config and weights (not its optimizer/step)
    epochs: int = 10
    max_steps: int = 0            # stop after this many optimizer steps (0 = run all epochs)
    encoder_trainable_from_epoch: int = -1   # -1 keeps the encoder frozen; 0 fine-tunes from the start
    precision: str = "bf16"       # bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"          # auto | cpu | cuda
    seed: int = 0
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written at every epoch end
    log_every: int = 1
    progress_seconds: float = 30.0  # >= 0; stdout not a terminal: a progress line at most this often; 0 = every step


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "eval": EvalConfig, "scst": ScstConfig}


def all_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def load_config(path: Path | None, overrides: list[str] = ()) -> TrainConfig:
    values = _read_toml(path) if path else {}
    for item in overrides:
        key, value = _parse_override(item)
        section, _, name = key.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = value
    return _build(values)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> TrainConfig:
    return _build(values)


def _read_toml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CapfastError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CapfastError(f"invalid TOML in {path}: {e}") from None


def _parse_override(item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise CapfastError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as `model.decoder=lstm`
    return key.strip(), value


def _build(values: dict) -> TrainConfig:
    top = {}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise CapfastError(f"config key {key!r} must be a section, e.g. [{key}]")
            top[key] = _make(SECTIONS[key], value, prefix=f"{key}.")
        else:
            top[key] = value
    return _make(TrainConfig, top, prefix="")


def _make(cls, values: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise CapfastError(_unknown_key_message(prefix + name))
        kwargs[name] = _coerce(prefix + name, fields[name], value)
    return cls(**kwargs)


def _coerce(key: str, f: dataclasses.Field, value):
    default = f.default if f.default is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(value):
        return value
    if isinstance(default, bool) and not isinstance(value, bool):
        raise CapfastError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise CapfastError(f"{key} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if default is not None and not isinstance(value, type(default)):
        raise CapfastError(f"{key} must be {type(default).__name__}, got {value!r}")
    return value


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"
