"""Sampled captions for self-critical training: K per image drawn from the model, plus optionally its greedy one.

All rows are generated together as one batch through the Captioner's incremental `step` API (KV cache), the image
encoded once and its cache rows repeated. Same conventions as capfast.models.generate: tokens without bos, eos
included, pad after eos; pad and bos are never drawn, nor eos before min_len tokens.
"""

import torch

from capfast.errors import CapfastError
from capfast.models.generate import check_lengths, constrain


@torch.no_grad()
def sample_captions(model, images: torch.Tensor, *, samples_per_image: int, max_len: int = 16,
                    temperature: float = 1.0, min_len: int = 1, greedy: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """-> tokens [B, G + K, max_len] where G = 1 if greedy (row 0 of each image is then its greedy caption).

    Samples come from softmax(log p / temperature) with `generator` (torch's default one when None).
    """
    check_lengths(max_len, min_len)
    if samples_per_image < 1:
        raise CapfastError(f"samples per image must be at least 1, got {samples_per_image}")
    if not temperature > 0:
        raise CapfastError(f"temperature must be positive, got {temperature}")
    memory = model.encode(images)
    B, device = memory.shape[0], memory.device
    rows_per_image = int(greedy) + samples_per_image
    state = model.init_state(memory).index_select(torch.arange(B, device=device).repeat_interleave(rows_per_image))
    is_greedy = (torch.arange(rows_per_image, device=device) < int(greedy)).repeat(B)
    N = B * rows_per_image
    tokens = torch.full((N,), model.bos_id, dtype=torch.long, device=device)
    hyps = torch.full((N, max_len), model.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_len):
        logprobs, state = model.step(tokens, state)
        logprobs = constrain(logprobs, hyps[:, :t], model, min_len=min_len, no_repeat_ngram=0)
        drawn = torch.multinomial((logprobs / temperature).softmax(dim=-1), 1, generator=generator).squeeze(1)
        tokens = torch.where(is_greedy, logprobs.argmax(dim=-1), drawn).masked_fill(done, model.pad_id)
        hyps[:, t] = tokens
        done |= tokens == model.eos_id
        if done.all():
            break
    return hyps.view(B, rows_per_image, max_len)
