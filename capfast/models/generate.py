"""Caption generation: batched greedy and beam search over a Captioner's incremental `step` API.

Both return (tokens [B, T] without bos, pad after eos; logprob [B] = sum of the chosen tokens' log-probabilities
including eos). max_len bounds the generated tokens, eos included; eos is forbidden before min_len tokens; pad
and bos are never generated. Put the model in eval mode first; the functions run under torch.no_grad.
GenerationOptions: what a user chooses (eval.* keys of a recipe, --beam and --max-len of eval and caption).
"""

from dataclasses import dataclass

import torch

from capfast.common.options import option
from capfast.errors import CapfastError

NEG_INF = float("-inf")


@dataclass
class GenerationOptions:
    beam_size: int = option(3, min=1)            # 1 = greedy
    max_len: int = option(20, min=1)             # longest generated caption in tokens, eos included


_DEFAULTS = GenerationOptions()


def repeated_ngram_mask(hyps: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """hyps [N, t] -> bool [N, V]: True for tokens that would repeat an n-gram already in the row."""
    N, t = hyps.shape
    mask = torch.zeros(N, vocab_size + 1, dtype=torch.bool, device=hyps.device)
    if t < n:
        return mask[:, :vocab_size]
    windows = hyps.unfold(1, n, 1)  # [N, t-n+1, n]
    suffix = hyps[:, t - n + 1:]  # the n-1 tokens a new token would complete
    matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=-1)
    banned = torch.where(matches, windows[..., -1], vocab_size)  # unmatched windows point at a spare column
    return mask.scatter_(1, banned, True)[:, :vocab_size]


def constrain(logprobs: torch.Tensor, hyps: torch.Tensor, model, *, min_len: int, no_repeat_ngram: int):
    """Sets forbidden next tokens to -inf (in place): pad, bos, eos before min_len, repeated n-grams."""
    step = hyps.shape[1]
    logprobs[:, [model.pad_id, model.bos_id]] = NEG_INF
    if step < min_len:
        logprobs[:, model.eos_id] = NEG_INF
    if no_repeat_ngram > 0:
        logprobs.masked_fill_(repeated_ngram_mask(hyps, no_repeat_ngram, logprobs.shape[1]), NEG_INF)
    return logprobs


def check_beam_size(beam_size, what: str = "beam_size") -> None:
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise CapfastError(f"{what} must be at least 1, got {beam_size}")


def check_lengths(max_len: int, min_len: int) -> None:
    if max_len < 1:
        raise CapfastError(f"max_len must be at least 1, got {max_len}")
    if not 0 <= min_len <= max_len:
        raise CapfastError(f"min_len must be between 0 and max_len={max_len}, got {min_len}")


@torch.no_grad()
def greedy(model, images: torch.Tensor, *, max_len: int = _DEFAULTS.max_len, min_len: int = 1,
           no_repeat_ngram: int = 0, use_cache: bool = True):
    """Most likely token at each step -> (tokens [B, T], logprob [B])."""
    check_lengths(max_len, min_len)
    memory = model.encode(images)
    B, device = memory.shape[0], memory.device
    state = model.init_state(memory, use_cache)
    tokens = torch.full((B,), model.bos_id, dtype=torch.long, device=device)
    hyps = torch.empty(B, 0, dtype=torch.long, device=device)
    total = torch.zeros(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logprobs, state = model.step(tokens, state)
        logprobs = constrain(logprobs, hyps, model, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
        best, tokens = logprobs.max(dim=-1)
        tokens = tokens.masked_fill(done, model.pad_id)
        total += best.masked_fill(done, 0.0)
        hyps = torch.cat([hyps, tokens.unsqueeze(1)], dim=1)
        done |= tokens == model.eos_id
        if done.all():
            break
    return hyps, total


def length_normalized(scores: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    return scores if alpha == 0 else scores / lengths.clamp(min=1).float() ** alpha


def only_pad_after_eos(logprobs: torch.Tensor, finished: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Finished rows may only continue with pad, at no cost, so their score stays what it was."""
    logprobs = logprobs.masked_fill(finished.unsqueeze(1), NEG_INF)
    logprobs[:, pad_id] = torch.where(finished, 0.0, logprobs[:, pad_id])
    return logprobs


@torch.no_grad()
def beam_search(model, images: torch.Tensor, *, beam_size: int = _DEFAULTS.beam_size,
                max_len: int = _DEFAULTS.max_len, min_len: int = 1, length_penalty: float = 1.0,
                no_repeat_ngram: int = 0, use_cache: bool = True):
    """Batched beam search -> best hypothesis per image (tokens [B, T], logprob [B]).

    Hypotheses are ranked by logprob / length**length_penalty (length counts eos), both while pruning and at
    the end; finished ones stay in the beam. The returned logprob is the unnormalized sum.
    """
    check_lengths(max_len, min_len)
    check_beam_size(beam_size)
    memory = model.encode(images)
    B, W, device = memory.shape[0], beam_size, memory.device
    rows = torch.arange(B, device=device)
    state = model.init_state(memory, use_cache).index_select(rows.repeat_interleave(W))
    tokens = torch.full((B * W,), model.bos_id, dtype=torch.long, device=device)
    hyps = torch.empty(B, W, 0, dtype=torch.long, device=device)
    scores = torch.full((B, W), NEG_INF, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    lengths = torch.zeros(B, W, dtype=torch.long, device=device)
    finished = torch.zeros(B, W, dtype=torch.bool, device=device)
    for step in range(max_len):
        logprobs, state = model.step(tokens, state)
        logprobs = constrain(logprobs, hyps.flatten(0, 1), model, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
        logprobs = only_pad_after_eos(logprobs, finished.flatten(), model.pad_id)
        V = logprobs.shape[1]
        candidates = scores.unsqueeze(2) + logprobs.view(B, W, V)  # [B, W, V]
        candidate_lengths = torch.where(finished, lengths, step + 1)
        ranked = length_normalized(candidates, candidate_lengths.unsqueeze(2), length_penalty)
        top = ranked.flatten(1).topk(W, dim=1).indices  # [B, W]
        source = top // V
        tokens = top % V
        scores = candidates.flatten(1).gather(1, top)
        lengths = candidate_lengths.gather(1, source)
        finished = finished.gather(1, source) | (tokens == model.eos_id)
        hyps = torch.cat([hyps.gather(1, source.unsqueeze(2).expand(-1, -1, step)), tokens.unsqueeze(2)], dim=2)
        state = state.index_select((source + rows.unsqueeze(1) * W).flatten())
        tokens = tokens.flatten()
        if finished.all():
            break
    best = length_normalized(scores, lengths, length_penalty).argmax(dim=1)
    return hyps[rows, best], scores[rows, best]


def generate(model, images: torch.Tensor, beam_size: int = 1, **kw):
    """Greedy for beam_size 1 (length_penalty does not matter there), beam search otherwise."""
    if beam_size == 1:
        kw.pop("length_penalty", None)
        return greedy(model, images, **kw)
    return beam_search(model, images, beam_size=beam_size, **kw)
