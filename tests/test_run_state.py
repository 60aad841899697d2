"""The training state and the model record: one write per step, validations that survive a kill, resume that
needs nothing but --out and the data, special token ids from the vocabulary, any path naming a model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train import SHALLOW, assert_clean_error

from capfast.errors import CapfastError
from capfast.models import ModelConfig, build_captioner, checkpoint
from capfast.models.record import ModelRecord
from capfast.models.run_dir import RunDir
from capfast.store.vocab import Vocab
from capfast.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
VALIDATED = ["eval.every_epochs=1", "eval.beam_size=1", "eval.max_len=8", "epochs=2", "checkpoint_every=4"]


def train(data, out, *overrides, resume=False):
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [*SHALLOW, *overrides])
    return Trainer(cfg, data, out, resume=resume).train()


@pytest.fixture
def saves(monkeypatch):
    """The checkpoint files written, in order (checkpoint.save still writes them)."""
    written, save = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, path: (written.append(Path(path).name), save(state, path)))
    return written


@pytest.fixture(scope="module")
def validated_run(converted, tmp_path_factory):
    """Two epochs of 4 steps, validated after each, checkpoint_every on the epochs' ends: a run whose every
    checkpoint used to be written twice."""
    out = tmp_path_factory.mktemp("validated")
    written, save = [], checkpoint.save
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save", lambda state, path: (written.append(Path(path).name), save(state, path)))
        summary = train(converted, out, *VALIDATED)
    return out, summary, written


def test_each_step_is_written_once_and_validations_only_log_and_link(validated_run):
    out, summary, written = validated_run
    assert written == ["step-00000004.pt", "step-00000008.pt"]
    log = RunDir(out).validations()
    assert [(e["step"], e["epoch"]) for e in log.entries] == [(4, 1), (8, 2)]
    best = log.best()
    assert best["metrics"]["CIDEr"] == summary["best_cider"]
    assert (out / "best.pt").samefile(out / "checkpoints" / f"step-{best['step']:08d}.pt")
    assert checkpoint.load(out / "best.pt")["train"]["step"] == best["step"]


def test_a_validation_cut_short_runs_on_resume_without_writing_a_checkpoint(validated_run, converted, tmp_path,
                                                                          saves):
    """A kill after step 8's save but before its validation ended: --resume validates step 8 and writes nothing."""
    out = tmp_path / "run"
    shutil.copytree(validated_run[0], out)
    run = RunDir(out)
    run.write_validations(run.validations().until(4))
    summary = train(converted, out, *VALIDATED, resume=True)
    assert summary["step"] == 8 and saves == []
    assert [e["step"] for e in run.validations().entries] == [4, 8]
    assert run.validations().at(8) == RunDir(validated_run[0]).validations().at(8)


def test_resume_reads_neither_init_from_nor_its_model(converted, validated_run, tmp_path):
    """init_from is read when a run starts only: a resumed run needs neither the file nor its architecture."""
    start = tmp_path / "start.pt"
    shutil.copyfile(validated_run[0] / "last.pt", start)
    init = f"init_from=\"{start}\""
    train(converted, tmp_path / "run", init, "epochs=2", "max_steps=5")  # stops mid-epoch 2
    start.unlink()
    assert train(converted, tmp_path / "run", init, "epochs=2", resume=True)["step"] == 8

    other = build_captioner(ModelConfig(encoder="resnet18", encoder_depth=1, d_model=16, n_layers=1, n_heads=2),
                            vocab_size=len(Vocab.load(converted / "vocab.json")), image_size=32)
    checkpoint.save({"model": ModelRecord.of(other, Vocab.load(converted / "vocab.json")).state_dict()}, start)
    assert train(converted, tmp_path / "run", init, "epochs=3", resume=True)["step"] == 12
    model = checkpoint.load(tmp_path / "run" / "last.pt")["model"]["model_config"]
    assert model["d_model"] == 32 and model["encoder_depth"] == 2  # the run's own, not the new init_from's


def test_special_token_ids_are_the_vocabulary_s_only(validated_run):
    with pytest.raises(CapfastError, match="unknown config key 'model.pad_id'"):
        load_config(None, ["model.pad_id=5"])
    record = checkpoint.load(validated_run[0] / "last.pt")["model"]
    former = {**record, "model_config": {**record["model_config"], "pad_id": 0, "bos_id": 1, "eos_id": 2}}
    assert ModelRecord.from_state_dict(former, "v2").config == ModelRecord.from_state_dict(record, "v3").config
    former["model_config"]["pad_id"] = 5
    with pytest.raises(CapfastError, match="sets model.pad_id=5, but the vocabulary's is 0"):
        ModelRecord.from_state_dict(former, "v2")


def version_2(state: dict) -> dict:
    """A version-3 checkpoint as version 2 wrote it: flat keys, the special ids in the model config."""
    model, train_state = state["model"], state["train"]
    return {"format": checkpoint.FORMAT, "version": 2, "model": model["weights"],
            "model_config": {**model["model_config"], "pad_id": 0, "bos_id": 1, "eos_id": 2},
            **{key: model[key] for key in ("vocab", "image_size", "normalization")},
            "train_config": train_state["config"], "optimizer": state["optimizer"], "scaler": state["scaler"],
            **{key: train_state[key] for key in ("step", "epoch", "batch_in_epoch", "world_size", "rng", "data",
                                                 "config_history")},
            "best_cider": 1.0, "stale_evals": 0, "metrics": {"CIDEr": 1.0}}


def test_a_version_2_checkpoint_still_captions_and_exports_but_resumes_in_one_line(validated_run, converted,
                                                                                    tmp_path, capfast_cli,
                                                                                    synth_coco):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(version_2(checkpoint.load(validated_run[0] / "last.pt")), out / "last.pt")
    image = sorted((synth_coco / "images" / "val").glob("*.jpg"))[0]
    old, new = (capfast_cli("caption", "--checkpoint", run / "last.pt", "--beam", "1", image)
                for run in (out, validated_run[0]))
    assert old.code == 0 and old.stdout == new.stdout, old.stderr
    assert capfast_cli("export", out / "last.pt", tmp_path / "model").code == 0
    assert json.loads((tmp_path / "model" / "config.json").read_text())["trained"]["metrics"] == {"CIDEr": 1.0}
    result = capfast_cli("train", "--config", ROOT / "configs" / "cpu_smoke.toml", "--data", converted, "--out", out,
                         "--resume", *SHALLOW)
    assert_clean_error(result, "is checkpoint version 2", "init_from=")


def test_a_run_directory_names_its_best_pt_then_its_last_pt(validated_run, tmp_path, capfast_cli, synth_coco):
    image = sorted((synth_coco / "images" / "val").glob("*.jpg"))[0]
    run = tmp_path / "run"
    shutil.copytree(validated_run[0], run)
    by_file = capfast_cli("caption", "--checkpoint", run / "best.pt", image)
    by_dir = capfast_cli("caption", "--checkpoint", run, image)
    assert by_dir.code == 0 and by_dir.stdout == by_file.stdout
    assert by_dir.stderr == f"capfast: note: {run} is a run directory: using its best.pt\n"
    (run / "best.pt").unlink()
    assert "using its last.pt" in capfast_cli("caption", "--checkpoint", run, image).stderr
    assert_clean_error(capfast_cli("caption", "--checkpoint", tmp_path, image),
                       f"{tmp_path} is neither a model folder of `capfast export`", "nor a run directory")
    exported = capfast_cli("export", run, tmp_path / "model")  # the export's model card takes its validation
    assert exported.code == 0, exported.stderr
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["trained"]["metrics"] == RunDir(run).validations().at(8)["metrics"]
