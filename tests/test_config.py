"""Config loading: every key's type, range and choices are checked at load time, with one-line errors."""

from pathlib import Path

import pytest

from capfast.errors import CapfastError
from capfast.models import ModelConfig
from capfast.train.config import all_keys, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=true", "data.batch_size must be an integer >= 1, got true"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("epochs=2.5", "epochs must be an integer"),
    ("log_every=0", "log_every must be an integer >= 1"),
    ("optim.grad_accum=0", "optim.grad_accum must be an integer >= 1"),
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=nan", "optim.lr must be a number > 0"),
    ("optim.lr=\"fast\"", "optim.lr must be a number"),
    ("model.encoder_weights=5", "model.encoder_weights must be a string, got 5"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be a list of 2 numbers, each >= 0 and < 1, got [0.9, 1.5]"),
    ("optim.betas=0.9", "optim.betas must be a list of 2 numbers"),
    ("data.crop_scale=[\"a\",1]", "data.crop_scale must be a list of 2 numbers, each > 0 and <= 1"),
    ("data.crop_scale=[1.0,0.5]", "data.crop_scale must be (low, high) with low <= high"),
    ("data.crop_ratio=[0,1]", "data.crop_ratio must be a list of 2 numbers, each > 0, got [0, 1]"),
    ("data.crop_ratio=[1.5,0.5]", "data.crop_ratio must be (low, high) with low <= high"),
    ("data.color_jitter=1", "data.color_jitter must be a number >= 0 and < 1"),
    ("data.order=shuffled", "data.order must be one of random, quasi_random, sequential"),
    ("data.train_split=\"../x\"", "data.train_split must be a split name"),
    ("precision=fp8", "precision must be one of bf16, fp16, fp32"),
    ("device=tpu", "device must be one of auto, cpu, cuda"),
    ("channels_last=1", "channels_last must be true or false"),
    ("model.decoder=gru", "model.decoder must be one of transformer, lstm"),
    ("model.encoder=vgg16", "model.encoder must be one of resnet18, resnet34, resnet50, resnet101, vit_b_16"),
    ("model.batchnorm=sync", "model.batchnorm must be one of frozen, batch"),
    ("model.dropout=1.0", "model.dropout must be a number >= 0 and < 1"),
    ("eval.beam_size=0", "eval.beam_size must be an integer >= 1"),
    ("eval.max_len=0", "eval.max_len must be an integer >= 1, got 0"),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("data.prefetch=-1", "data.prefetch must be an integer >= 0, got -1"),
    ("data.prefetch=true", "data.prefetch must be an integer >= 0, got true"),
    ("progress_seconds=-1", "progress_seconds must be a number >= 0, got -1"),
    ("progress_seconds=\"often\"", "progress_seconds must be a number >= 0"),
    ("objective=rl", "objective must be one of xe, scst, got \"rl\""),
    ("scst.samples=0", "scst.samples must be an integer >= 1, got 0"),
    ("scst.baseline=max", "scst.baseline must be one of mean, greedy"),
    ("scst.temperature=0", "scst.temperature must be a number > 0, got 0"),
    ("init_from=3", "init_from must be a string, got 3"),
    ("model=3", "config key 'model' must be a section"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(CapfastError) as error:
        load_config(ROOT / "configs" / "cpu_smoke.toml", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_values_in_a_toml_recipe_are_checked_too(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("epochs = 3\n[optim]\nweight_decay = -0.1\n")
    with pytest.raises(CapfastError, match="optim.weight_decay must be a number >= 0, got -0.1"):
        load_config(recipe)


def test_good_values_are_converted():
    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml",
                      ["optim.lr=1", "data.crop_scale=[1, 1]", "model.encoder_weights=\"w.pt\"", "model.decoder=lstm"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.crop_scale == (1.0, 1.0) and cfg.model.encoder_weights == "w.pt"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads_and_multi_gpu_recipes_keep_ddp_equivalence(recipe):
    cfg = load_config(recipe)
    # frozen BN is what makes N ranks x B/N train like 1 x B (README); cpu_smoke trains a random trunk on one
    # process and uses batch statistics (README says so)
    assert cfg.model.batchnorm == ("batch" if recipe.stem == "cpu_smoke" else "frozen")


def test_every_key_is_classified_for_resume_exactly_once():
    """A key resume neither refuses nor knows to be safe is refused: each must be in one of resume.py's lists."""
    from capfast.train import resume

    for key in all_keys():
        assert resume.is_fixed(key) != resume.is_safe(key), key
    assert resume.is_safe("data.prefetch") and resume.is_safe("progress_seconds")


def test_model_config_from_a_checkpoint_is_checked():
    with pytest.raises(CapfastError, match="model.n_layers must be an integer >= 1, got 0"):
        ModelConfig.from_dict({"n_layers": 0})


def test_a_bad_override_on_the_command_line_is_one_line(converted, tmp_path, capfast_cli):
    result = capfast_cli("train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted,
                         "--out", tmp_path / "run", "data.batch_size=true")
    assert result.code != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "capfast: error: data.batch_size must be an integer >= 1, got true"
