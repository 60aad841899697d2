"""Training configuration: dataclasses, loaded from a TOML recipe and `section.key=value` overrides."""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from capfast.common.options import build, option
from capfast.common.precision import DEVICES, DTYPES
from capfast.common.signals import DEFAULT_STOP_SIGNALS, signals_problem
from capfast.data.options import LoaderOptions
from capfast.errors import CapfastError
from capfast.models import ModelConfig
from capfast.models.generate import GenerationOptions
from capfast.store.feature_cache import name_problem
from capfast.store.schema import split_name_problem

OBJECTIVES = ("xe", "scst")
SCST_BASELINES = ("mean", "greedy")


@dataclass
class DataConfig(LoaderOptions):
    """[data]: the loader's options (capfast.data.LoaderOptions, keys data.batch_size etc.) and the splits read."""

    train_split: str = option("train", check=split_name_problem)
    val_split: str = option("val", check=split_name_problem)
    # a feature cache of `capfast features` in DATA/features/NAME: read instead of images (a frozen trunk only)
    features: str = option("", check=name_problem)


@dataclass
class OptimConfig:
    """Learning rates: `encoder_lr` for the encoder's trunk (the ResNet; it trains only from
    encoder_trainable_from_epoch on), `lr` for the rest -- the decoder and the projection and LayerNorm between trunk
    and decoder, which always train (capfast.models.captioner.TRUNK_PREFIX)."""

    lr: float = option(3e-4, above=0)            # decoder, and the encoder's projection and norm
    encoder_lr: float = option(1e-4, min=0)      # the encoder's trunk, once it is trainable
    weight_decay: float = option(0.01, min=0)
    betas: tuple[float, float] = option((0.9, 0.98), min=0, below=1)
    warmup_steps: int = option(500, min=0)
    min_lr_ratio: float = option(0.01, min=0, max=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = option(1.0, min=0)        # 0 disables
    label_smoothing: float = option(0.1, min=0, below=1)
    grad_accum: int = option(1, min=1)           # micro-batches per optimizer step


@dataclass
class EvalConfig(GenerationOptions):
    """[eval]: generation's options (capfast.models.generate.GenerationOptions, keys eval.beam_size etc.) and when
    and on how many images validation runs during training."""

    every_epochs: int = option(1, min=0)         # 0 disables validation during training
    max_images: int = option(0, min=0)           # over all ranks; 0 = the whole validation split
    log_images: int = option(4, min=0)           # images with generated captions shown in TensorBoard
    patience: int = option(0, min=0)             # stop after this many validations in a row without a new best CIDEr


@dataclass
class ScstConfig:
    """Self-critical sequence training (objective = "scst"): reward = CIDEr-D against the training references."""

    samples: int = option(5, min=1)              # sampled captions per image (>= 2 with baseline = "mean")
    baseline: str = option("mean", choices=SCST_BASELINES)  # mean: of the image's other samples' rewards | greedy
    max_len: int = option(16, min=1)             # longest sampled caption in tokens, eos included (< max_positions)
    temperature: float = option(1.0, above=0)    # sampling (and the gradient) use softmax(logits / temperature)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    objective: str = option("xe", choices=OBJECTIVES)  # xe: cross-entropy on the references | scst: self-critical
    init_from: str = option("")                  # checkpoint to start from: its model config and weights only
    epochs: int = option(10, min=1)
    max_steps: int = option(0, min=0)            # stop after this many optimizer steps (0 = run all epochs)
    # the encoder's trunk: -1 keeps it frozen; 0 fine-tunes it from the start (its projection and norm always train)
    encoder_trainable_from_epoch: int = option(-1, min=-1)
    precision: str = option("bf16", choices=tuple(DTYPES))  # bf16 | fp16 | fp32
    channels_last: bool = option(True)
    compile: bool = option(False)
    device: str = option("auto", choices=DEVICES)  # auto | cpu | cuda
    seed: int = option(0, min=0)
    checkpoint_every: int = option(1000, min=0)  # optimizer steps; 0 = only at epoch ends (always written there)
    log_every: int = option(1, min=1)            # TensorBoard scalars every this many steps
    progress_seconds: float = option(30.0, min=0)  # stdout not a terminal: a line at most this often; 0 = every step
    # faults (README, "Faults and restarts"):
    keep_last: int = option(2, min=1)            # checkpoints kept in OUT/checkpoints/ (last.pt is the newest)
    stop_signals: str = option(DEFAULT_STOP_SIGNALS, check=signals_problem)  # stop at a step boundary, save, exit 75
    dist_timeout_s: float = option(600.0, above=0)  # a rank with no step done for this long ends the job, named
    nonfinite_skips: int = option(0, min=0)      # non-finite steps in a row skipped (weights kept) before stopping


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


def check_consistency(cfg: TrainConfig) -> None:
    """Rules between keys, checked once the model config is final (init_from may replace it)."""
    if cfg.data.features:
        check_cached_trunk(cfg)
    scst = cfg.scst
    if cfg.objective != "scst":
        return
    if scst.baseline == "mean" and scst.samples < 2:
        raise CapfastError(f"scst.samples={scst.samples}: the mean baseline needs at least 2 samples per image "
                           f"(or use scst.baseline=\"greedy\")")
    if scst.max_len >= cfg.model.max_positions:
        raise CapfastError(f"scst.max_len must be below model.max_positions = {cfg.model.max_positions}, "
                           f"got {scst.max_len}")


def check_cached_trunk(cfg: TrainConfig) -> None:
    """A feature cache holds a frozen trunk's output for one view of each image: nothing before the trunk may
    change per step."""
    if cfg.encoder_trainable_from_epoch >= 0:
        raise CapfastError(f"data.features reads a frozen trunk's cached output, but encoder_trainable_from_epoch="
                           f"{cfg.encoder_trainable_from_epoch} would train the trunk; keep it at -1 (to fine-tune "
                           f"the trunk, start a run from images with init_from= this run's checkpoint)")
    if cfg.data.color_jitter > 0:
        raise CapfastError("data.color_jitter applies to images before the trunk; a feature cache has none "
                           "(set data.color_jitter=0, or train from images)")
    if cfg.data.verify:
        raise CapfastError("data.verify checks the records a run decodes; from a feature cache it decodes none "
                           "(check the betons once with `capfast inspect --verify` instead)")


def _build(values: dict) -> TrainConfig:
    top = {}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise CapfastError(f"config key {key!r} must be a section, e.g. [{key}]")
            top[key] = build(SECTIONS[key], value, prefix=f"{key}.", unknown_key=_unknown_key_message)
        else:
            top[key] = value
    return build(TrainConfig, top, unknown_key=_unknown_key_message)


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"
