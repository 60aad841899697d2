import copy

import pytest
import torch
import torch.nn.functional as F

from capfast.errors import CapfastError
from capfast.models import ModelConfig, build_captioner
from capfast.models.generate import beam_search, generate, greedy, repeated_ngram_mask

VOCAB, PAD, BOS, EOS = 24, 0, 1, 2
# One caption per image, of different lengths, so eos placement is learnt too.
WORDS = [[5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15, 13, 14, 15]]


def tiny_model(decoder="transformer", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder="resnet18", decoder=decoder, d_model=32, n_layers=2, n_heads=4, lstm_hidden=32,
                      attn_dim=32, embed_dim=32, dropout=0.0, max_positions=24)
    return build_captioner(cfg, VOCAB)


def training_images():
    """Distinct colours and ramps: a frozen random ResNet tells these apart, unlike noise images."""
    colors = torch.tensor([[2.0, -2, 0], [-2, 2, 1], [0, -1, -2], [1, 1, 2]])
    ramp = torch.linspace(-1, 1, 32)[None, None, :, None] * torch.tensor([1.0, -1, 0.5, 0])[:, None, None, None]
    return colors[:, :, None, None] + ramp.expand(-1, 3, 32, 32)


def random_images(n=6, seed=5):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def training_captions():
    caps = torch.full((len(WORDS), 1, 9), PAD)
    for i, words in enumerate(WORDS):
        caps[i, 0, :len(words) + 2] = torch.tensor([BOS, *words, EOS])
    return caps


def train(model, steps):
    imgs, caps = training_images(), training_captions()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(imgs, caps)
        loss = F.cross_entropy(logits.flatten(0, -2), caps[..., 1:].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_models():
    """(briefly trained: still unsure, fully trained: reproduces WORDS) tiny transformers."""
    model = tiny_model()
    model.set_encoder_trainable(False)
    brief = copy.deepcopy(train(model, 8))
    return brief, train(model.train(), 52)


def sequence_logprob(model, imgs, tokens):
    """Teacher-forced sum of log-probs of `tokens` (up to and including the first eos)."""
    caps = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens], dim=1).unsqueeze(1)
    with torch.no_grad():
        logprobs = model(imgs, caps).float().log_softmax(-1)[:, 0]
    picked = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(tokens == PAD, 0.0).sum(-1)


def first_eos(tokens):
    """Index of each row's eos, or the row length when there is none."""
    is_eos = (tokens == EOS).int()
    return torch.where(is_eos.any(1), is_eos.argmax(1), tokens.shape[1])


def assert_well_formed(tokens, max_len):
    assert tokens.dtype == torch.long and tokens.shape[1] <= max_len
    assert not (tokens == BOS).any()
    for row, end in zip(tokens, first_eos(tokens)):
        assert (row[:end] != PAD).all() and (row[end + 1:] == PAD).all()


def test_fully_trained_model_reproduces_its_captions(trained_models):
    tokens, _ = greedy(trained_models[1], training_images(), max_len=10)
    for row, words in zip(tokens, WORDS):
        assert row[:len(words) + 1].tolist() == [*words, EOS]


@pytest.mark.parametrize("decoder", ["transformer", "lstm"])
def test_beam_of_one_equals_greedy(decoder, trained_models):
    model = trained_models[0] if decoder == "transformer" else tiny_model("lstm").eval()
    imgs = random_images()
    g_tokens, g_logprob = greedy(model, imgs, max_len=8)
    b_tokens, b_logprob = beam_search(model, imgs, beam_size=1, max_len=8)
    assert torch.equal(g_tokens, b_tokens)
    torch.testing.assert_close(g_logprob, b_logprob)


@pytest.mark.parametrize("decoder", ["transformer", "lstm"])
def test_returned_logprob_is_the_sequence_logprob(decoder, trained_models):
    model = trained_models[0] if decoder == "transformer" else tiny_model("lstm").eval()
    imgs = random_images()
    for tokens, logprob in [greedy(model, imgs, max_len=8), beam_search(model, imgs, beam_size=3, max_len=8)]:
        assert_well_formed(tokens, 8)
        torch.testing.assert_close(logprob, sequence_logprob(model, imgs, tokens), atol=1e-4, rtol=1e-4)


def test_beam_finds_at_least_greedys_logprob(trained_models):
    imgs = torch.cat([training_images(), random_images()])
    gains = []
    for model in [tiny_model(seed=1).eval(), trained_models[0]]:  # unsure models, where beams can differ
        _, g_logprob = greedy(model, imgs, max_len=10)
        _, b_logprob = beam_search(model, imgs, beam_size=4, max_len=10, length_penalty=0.0)
        gains.append(b_logprob - g_logprob)
    gains = torch.cat(gains)
    assert (gains >= -1e-5).all()
    assert (gains > 1e-3).any(), "beam never beat greedy: the test models are too sure"


def test_length_penalty_favours_longer_captions(trained_models):
    imgs = torch.cat([training_images(), random_images()])
    raw, _ = beam_search(trained_models[0], imgs, beam_size=4, max_len=10, length_penalty=0.0)
    normalized, _ = beam_search(trained_models[0], imgs, beam_size=4, max_len=10, length_penalty=2.0)
    assert first_eos(normalized).sum() >= first_eos(raw).sum()


def test_cached_decoding_equals_uncached(trained_models):
    model, imgs = trained_models[0], random_images()
    for search, kw in [(greedy, {}), (beam_search, {"beam_size": 3})]:
        cached = search(model, imgs, max_len=10, **kw)
        uncached = search(model, imgs, max_len=10, use_cache=False, **kw)
        assert torch.equal(cached[0], uncached[0])
        torch.testing.assert_close(cached[1], uncached[1], atol=1e-4, rtol=1e-4)


def test_cached_step_logprobs_match_uncached(trained_models):
    model = trained_models[0]
    memory = model.encode(random_images(n=3))
    states = [model.init_state(memory, use_cache=flag) for flag in (True, False)]
    tokens = torch.full((3,), BOS)
    with torch.no_grad():
        for _ in range(6):
            (cached, states[0]), (uncached, states[1]) = (model.step(tokens, s) for s in states)
            torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-4)
            tokens = cached.argmax(-1)


def test_min_len_forbids_early_eos(trained_models):
    model, imgs = trained_models[1], training_images()
    assert first_eos(greedy(model, imgs, max_len=10, min_len=1)[0]).min() < 4  # eos comes early unforced
    for tokens, _ in [greedy(model, imgs, max_len=10, min_len=4), beam_search(model, imgs, max_len=10, min_len=4)]:
        assert (first_eos(tokens) >= 4).all()


def test_no_eos_at_all_when_min_len_is_max_len(trained_models):
    tokens, _ = beam_search(trained_models[1], training_images(), max_len=6, min_len=6)
    assert tokens.shape == (4, 6) and not (tokens == EOS).any() and not (tokens == PAD).any()


def has_repeated_ngram(row, n):
    row = row[:int(first_eos(row[None])[0])].tolist()
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n, trained_models):
    model, imgs = trained_models[1], training_images()  # caption 3 repeats "13 14 15"
    assert has_repeated_ngram(greedy(model, imgs, max_len=10)[0][3], n)
    for search, kw in [(greedy, {}), (beam_search, {"beam_size": 3})]:
        tokens, _ = search(model, imgs, max_len=10, no_repeat_ngram=n, **kw)
        assert not any(has_repeated_ngram(row, n) for row in tokens)


def test_repeated_ngram_mask_bans_the_completing_token():
    hyps = torch.tensor([[5, 6, 7, 5], [5, 6, 7, 8]])
    mask = repeated_ngram_mask(hyps, 2, 10)
    assert mask[0].nonzero().flatten().tolist() == [6]
    assert not mask[1].any()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_lstm_decoding(beam_size):
    model, imgs = tiny_model("lstm").eval(), random_images()
    tokens, logprob = generate(model, imgs, beam_size=beam_size, max_len=7, min_len=2)
    assert tokens.shape[0] == 6 and torch.isfinite(logprob).all()
    assert_well_formed(tokens, 7)
    assert (first_eos(tokens) >= 2).all()


def test_generate_routes_by_beam_size(trained_models):
    model, imgs = trained_models[0], random_images()
    assert torch.equal(generate(model, imgs, max_len=8, length_penalty=0.7)[0], greedy(model, imgs, max_len=8)[0])
    assert torch.equal(generate(model, imgs, beam_size=3, max_len=8)[0],
                       beam_search(model, imgs, beam_size=3, max_len=8)[0])


def test_decoding_under_inference_mode_and_bf16_autocast(trained_models):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, logprob = beam_search(trained_models[1], training_images(), beam_size=2, max_len=10)
    assert tokens[0, :6].tolist() == [*WORDS[0], EOS] and logprob.dtype == torch.float32


def test_decoding_past_max_positions_raises(trained_models):
    with pytest.raises(CapfastError, match="max_positions"):
        greedy(trained_models[0], random_images(), max_len=40, min_len=40)


def test_bad_lengths_raise(trained_models):
    with pytest.raises(CapfastError):
        greedy(trained_models[0], random_images(), max_len=5, min_len=6)
    with pytest.raises(CapfastError):
        beam_search(trained_models[0], random_images(), beam_size=0)
