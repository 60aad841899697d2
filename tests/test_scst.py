"""Self-critical training: sampling, the loss's distribution, a short run with its scalars and resume, bad input."""

import contextlib
import dataclasses
import shutil
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from test_train import SHALLOW, assert_clean_error

from capfast.models import ModelConfig, build_captioner, checkpoint
from capfast.models.run_dir import RunDir
from capfast.models.sampling import sample_captions
from capfast.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# test_train's SHALLOW recipe, the encoder left as the recipe says (SCST tests choose frozen or trainable themselves)
RECIPE = [o for o in SHALLOW if not o.startswith("encoder_trainable_from_epoch")]
SCST = ["objective=\"scst\"", "scst.samples=3", "scst.max_len=8", "optim.lr=1e-4", "optim.warmup_steps=0"]
SCALARS = ("scst/reward", "scst/baseline", "scst/advantage", "scst/sample_len", "scst/entropy", "scst/reward_ms")


def tiny_model(decoder: str, vocab_size: int = 12):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", decoder=decoder, d_model=16, n_layers=1, n_heads=2, dropout=0.0,
                      lstm_hidden=16, attn_dim=16, embed_dim=16)
    return build_captioner(cfg, vocab_size).eval()


@pytest.mark.parametrize("decoder", ["transformer", "lstm"])
def test_samples_stop_at_eos_and_greedy_row_is_greedy(decoder):
    from capfast.models.generate import greedy

    model = tiny_model(decoder)
    images = torch.randn(3, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_captions(model, images, samples_per_image=6, max_len=9, temperature=3.0, greedy=True,
                             generator=generator)
    assert tokens.shape == (3, 7, 9)
    rows = tokens.flatten(0, 1)
    ended = torch.cumsum(rows == model.eos_id, dim=1) > 0
    after_eos = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1)
    assert (rows[after_eos] == model.pad_id).all() and after_eos.any()
    assert not torch.isin(rows[~after_eos], torch.tensor([model.pad_id, model.bos_id])).any()
    assert (rows[:, 0] != model.eos_id).all()  # min_len 1: no empty caption
    assert ended[:, -1].any() and (~ended[:, -1]).any()  # some finished, some ran to max_len
    want, _ = greedy(model, images, max_len=9)
    torch.testing.assert_close(tokens[:, 0, :want.shape[1]], want)
    again = sample_captions(model, images, samples_per_image=6, max_len=9, temperature=3.0, greedy=True,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens)


def test_loss_differentiates_the_distribution_the_samples_came_from():
    """log p(sample) of the teacher-forced pass = the sum of the sampler's step log-probabilities (pad and bos
    banned, eos banned at the first step, temperature applied)."""
    from capfast.models.generate import constrain
    from capfast.train.scst import SelfCritical

    model = tiny_model("transformer")
    images = torch.randn(2, 3, 32, 32)
    temperature = 1.7
    tokens = sample_captions(model, images, samples_per_image=4, max_len=7, temperature=temperature,
                             generator=torch.Generator().manual_seed(1))
    rows = tokens.flatten(0, 1)
    state = model.init_state(model.encode(images)).index_select(torch.arange(2).repeat_interleave(4))
    previous = torch.full((8,), model.bos_id)
    want = torch.zeros(8)
    for t in range(rows.shape[1]):
        logprobs, state = model.step(previous, state)
        logprobs = constrain(logprobs, rows[:, :t], model, min_len=1, no_repeat_ngram=0)
        step = (logprobs / temperature).log_softmax(dim=-1).gather(1, rows[:, t:t + 1]).squeeze(1)
        live = rows[:, t] != model.pad_id
        want += torch.where(live, step, 0.0)
        previous = rows[:, t]

    cfg = load_config(None, [f"scst.temperature={temperature}"])
    objective = SelfCritical(cfg, reward=None, rank=0, amp_dtype=None)
    captions = torch.cat([torch.full((2, 4, 1), model.bos_id), tokens], dim=2)
    got = objective.policy_loss_sum(model(images, captions), captions, advantages=-torch.ones(2, 4))
    torch.testing.assert_close(got, want.sum(), rtol=1e-5, atol=1e-5)
    assert objective.pop_stats()["scst/entropy"] > 0


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_advantage_is_the_reward_minus_the_configured_baseline(baseline):
    """mean: the average reward of the image's other samples; greedy: the greedy caption's (row 0) reward."""
    from capfast.eval.cider import CiderD
    from capfast.store.vocab import SPECIALS
    from capfast.train.scst import ScstBatch, SelfCritical

    words = list(SPECIALS) + ["a", "red", "blue", "circle", "square", "big"]
    ids = {w: i for i, w in enumerate(words)}
    reward = CiderD.from_token_lists({10: [["a", "red", "circle"], ["a", "big", "red", "circle"]],
                                      11: [["a", "blue", "square"]], 12: [["big", "square"]]}, words)
    captions = [["a", "red", "circle"], ["red", "circle"], ["a", "big", "red", "circle"], ["blue"],
                ["a", "blue", "square"], ["square"], ["a", "blue"], ["a", "red", "circle"]]
    rows = torch.zeros(2, 4, 6, dtype=torch.long)
    for i, caption in enumerate(captions):
        rows[i // 4, i % 4, :len(caption) + 1] = torch.tensor([ids[w] for w in caption] + [ids["<eos>"]])
    image_ids = torch.tensor([10, 11])
    r = reward.score(rows.flatten(0, 1).numpy(), image_ids.repeat_interleave(4).numpy(), ids["<eos>"]).reshape(2, 4)
    assert len(set(r.flatten().round(9))) > 4  # distinct rewards: a wrong baseline cannot pass by accident

    cfg = load_config(None, [f"scst.baseline=\"{baseline}\"", f"scst.samples={4 - (baseline == 'greedy')}"])
    objective = SelfCritical(cfg, reward, rank=0, amp_dtype=None)
    got = objective.advantages(ScstBatch(None, torch.zeros(1), rows.numpy(), image_ids.numpy())).double()
    if baseline == "mean":
        want = [[r[b, k] - sum(r[b, j] for j in range(4) if j != k) / 3 for k in range(4)] for b in range(2)]
        samples = r
    else:
        want = [[r[b, k] - r[b, 0] for k in range(1, 4)] for b in range(2)]
        samples = r[:, 1:]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    stats = objective.pop_stats()
    assert stats["scst/reward"] == pytest.approx(samples.mean())
    assert stats["scst/baseline"] == pytest.approx(float(samples.mean() - torch.tensor(want).mean()))


# ---- training runs -------------------------------------------------------------------------------------

def train(data, out, *overrides, resume=False):
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml", [*RECIPE, *overrides])
    return Trainer(cfg, data, out, resume=resume).train()


@pytest.fixture(scope="module")
def xe_checkpoint(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("xe")
    train(converted, out, "epochs=1")
    return out / "last.pt"


def test_scst_run_logs_its_scalars_and_resumes_exactly(converted, xe_checkpoint, tmp_path, tb_scalars):
    init = f"init_from=\"{xe_checkpoint}\""
    train(converted, tmp_path / "full", *SCST, init, "epochs=1")
    train(converted, tmp_path / "cut", *SCST, init, "epochs=1", "max_steps=2")  # stops mid-epoch
    train(converted, tmp_path / "cut", *SCST, init, "epochs=1", resume=True)
    full, cut = tb_scalars(tmp_path / "full"), tb_scalars(tmp_path / "cut")
    for tag in ("train/loss", *SCALARS):
        assert sorted(full[tag]) == sorted(cut[tag]) == [1, 2, 3, 4], tag
    for tag in ("train/loss", "scst/reward", "scst/baseline", "scst/sample_len", "scst/entropy"):
        for step, value in full[tag].items():
            assert cut[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-5), (tag, step)
    assert all(0 <= v <= 10 for v in full["scst/reward"].values())
    assert max(full["scst/reward"].values()) > 0
    assert all(1 <= v <= 8 for v in full["scst/sample_len"].values())
    assert all(v == pytest.approx(0, abs=1e-9) for v in full["scst/advantage"].values())  # mean baseline
    assert (converted / "cider_train.npz").is_file()
    start, end = (checkpoint.load(p)["model"]["weights"] for p in (xe_checkpoint, tmp_path / "full" / "last.pt"))
    # trainable (cpu_smoke)
    assert not torch.equal(start["encoder.trunk.conv1.weight"], end["encoder.trunk.conv1.weight"])


def test_scst_in_bf16_with_a_frozen_encoder(converted, xe_checkpoint, tmp_path, tb_scalars):
    train(converted, tmp_path / "run", *SCST, f"init_from=\"{xe_checkpoint}\"", "scst.baseline=\"greedy\"",
          "precision=\"bf16\"", "encoder_trainable_from_epoch=-1", "max_steps=2")
    scalars = tb_scalars(tmp_path / "run")
    assert sorted(scalars["scst/reward"]) == [1, 2] and max(scalars["scst/reward"].values()) > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars["train/loss"].values())
    start, end = (checkpoint.load(p)["model"]["weights"] for p in (xe_checkpoint, tmp_path / "run" / "last.pt"))
    trunk = [name for name in start if name.startswith("encoder.trunk.")]
    assert trunk and all(torch.equal(start[name], end[name]) for name in trunk)  # weights and BN statistics
    assert not torch.equal(start["decoder.tok_emb.weight"], end["decoder.tok_emb.weight"])


def test_scst_gradient_is_a_mean_over_all_samples_of_the_step(converted, xe_checkpoint, tmp_path):
    """Two halves of a batch, each normalized by the whole step's sample count, give the whole batch's gradient:
    what gradient accumulation and DDP (N ranks x B/N) rely on."""
    from capfast.train.scst import ScstBatch
    from capfast.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "cpu_smoke.toml",
                      [*RECIPE, *SCST, "scst.baseline=\"greedy\"", f"init_from=\"{xe_checkpoint}\""])
    trainer = Trainer(cfg, converted, tmp_path / "run")
    trainer._set_encoder_trainable(0)
    with contextlib.closing(trainer.train_loader.epoch(0)) as epoch:
        batch = next(epoch)
    trainer.model.eval()
    whole = trainer.scst.prepare(trainer.model, batch, step=0, micro=0)
    assert trainer.scst.advantages(whole).abs().sum() > 0
    count = torch.tensor(float(whole.captions.shape[0] * whole.captions.shape[1]))

    def gradients(parts):
        trainer.optimizer.zero_grad(set_to_none=True)
        for part in parts:
            trainer._forward_backward(part, count)
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    one = gradients([whole])
    halves = gradients([ScstBatch(*(getattr(whole, f.name)[s] for f in dataclasses.fields(ScstBatch)))
                        for s in (slice(0, 4), slice(4, 8))])
    assert one
    for name, grad in one.items():
        torch.testing.assert_close(halves[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_start_is_validated_kept_as_best_and_patience_stops_also_across_a_resume(converted, xe_checkpoint, tmp_path):
    """A run from init_from scores its start first; with a learning rate too small to change a caption no later
    validation beats it, so best.pt stays the start (step 0) and eval.patience=2 stops after the second epoch --
    also when the run is cut after its first epoch and resumed (last.pt carries the count)."""
    still = [*SCST, f"init_from=\"{xe_checkpoint}\"", "optim.lr=1e-12", "optim.encoder_lr=0", "epochs=4",
             "eval.every_epochs=1", "eval.patience=2", "eval.beam_size=1"]
    summary = train(converted, tmp_path / "full", *still)
    assert summary["epoch"] == 2 and summary["last_cider"] == summary["best_cider"]
    assert checkpoint.load(tmp_path / "full" / "best.pt")["train"]["step"] == 0
    assert RunDir(tmp_path / "full").validations().best() == {"step": 0, "epoch": 0, "metrics": ANY}
    assert RunDir(tmp_path / "full").validations().best()["metrics"]["CIDEr"] == summary["best_cider"]

    train(converted, tmp_path / "cut", *still, "max_steps=4")  # one epoch of 4 steps
    resumed = train(converted, tmp_path / "cut", *still, resume=True)
    assert resumed["epoch"] == 2 and resumed["step"] == summary["step"]


def test_the_end_of_a_run_below_its_best_is_one_line_naming_best_pt(tmp_path):
    from capfast.train.cli import worse_than_best

    note = worse_than_best({"last_cider": 4.889, "best_cider": 5.163}, tmp_path)
    assert note == ("capfast: note: the final model's val CIDEr 4.889 is below the best, 5.163: "
                    f"{tmp_path / 'best.pt'} holds that one")
    assert worse_than_best({"last_cider": 5.2, "best_cider": 5.2}, tmp_path) == ""
    assert worse_than_best({"last_cider": None, "best_cider": float("-inf")}, tmp_path) == ""


# ---- bad input: one line, no traceback, non-zero exit ---------------------------------------------------

def scst_cli(capfast_cli, data, out, *overrides):
    return capfast_cli("train", "--config", ROOT / "configs/cpu_smoke.toml", "--data", data, "--out", out,
                       *RECIPE, *SCST, *overrides)


def test_bad_scst_inputs(converted, xe_checkpoint, tmp_path, capfast_cli):
    init = f"init_from=\"{xe_checkpoint}\""
    result = scst_cli(capfast_cli, converted, tmp_path / "a", f"init_from=\"{tmp_path / 'none.pt'}\"")
    assert_clean_error(result, "init_from checkpoint not found")

    state = torch.load(xe_checkpoint, weights_only=False)
    state["model"]["vocab"] = state["model"]["vocab"][:-1]
    torch.save(state, tmp_path / "other_vocab.pt")
    result = scst_cli(capfast_cli, converted, tmp_path / "b", f"init_from=\"{tmp_path / 'other_vocab.pt'}\"")
    assert_clean_error(result, "different vocabulary")

    result = scst_cli(capfast_cli, converted, tmp_path / "c", init, "objective=\"rl\"")
    assert_clean_error(result, "objective must be one of xe, scst")

    result = scst_cli(capfast_cli, converted, tmp_path / "c", init, "scst.samples=1")
    assert_clean_error(result, "mean baseline needs at least 2 samples")

    no_refs = tmp_path / "no_refs"
    shutil.copytree(converted, no_refs)
    (no_refs / "refs_train.json").unlink()
    result = scst_cli(capfast_cli, no_refs, tmp_path / "d", init)
    assert_clean_error(result, "refs_train.json not found")


@pytest.mark.gpu
def test_scst_on_cuda_in_bf16(converted, xe_checkpoint, tmp_path, tb_scalars):
    """The GPU path end to end: nvJPEG batches, sampling with a CUDA generator under bf16 autocast, the reward
    on the host, the loss and its gradient on the device."""
    init = f"init_from=\"{xe_checkpoint}\""
    train(converted, tmp_path / "run", *SCST, init, "epochs=1", "device=\"cuda\"", "precision=\"bf16\"")
    scalars = tb_scalars(tmp_path / "run")
    for tag in ("train/loss", *SCALARS):
        assert sorted(scalars[tag]) == [1, 2, 3, 4], tag
        assert all(torch.isfinite(torch.tensor(v)) for v in scalars[tag].values()), tag
    assert max(scalars["scst/reward"].values()) > 0
