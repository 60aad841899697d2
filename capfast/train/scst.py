"""Self-critical sequence training (Rennie et al. 2017): the objective the Trainer runs when objective = "scst".

A step: per image, K captions are sampled from the model (no gradient, KV cache). One teacher-forced forward
pass over the samples gives log p(sample) with a gradient, through the same (DDP-wrapped, maybe compiled)
forward as cross-entropy; while the device runs it, the host scores the samples with CIDEr-D against their
image's references. The baseline is the greedy caption's reward or the mean reward of the image's other K-1
samples, and

    loss = -(1 / #samples) * sum over samples of (reward - baseline) * sum over its tokens of log p(token),

tokens up to and including eos. The mean is over the step's sampled captions on all ranks and micro-batches,
a count fixed by the batch size, so N ranks x B/N give exactly the gradient of 1 x B for the same samples.

The model runs in eval mode throughout (no dropout, BatchNorm statistics fixed): the policy trained is the one
that captions at test time, and the distribution the samples came from is exactly the one differentiated.
Sampling draws from a generator seeded by (seed, step, rank, micro-batch), so a resumed run samples the same.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from capfast.common.precision import autocast_context
from capfast.models.sampling import sample_captions
from capfast.store.vocab import Vocab

MIN_LEN = 1  # no empty captions


@dataclass
class ScstBatch:
    images: torch.Tensor      # [B, 3, H, W] as the loader gave them
    captions: torch.Tensor    # [B, K, max_len + 1]: bos + sampled tokens, pad after eos (on the device)
    rows: np.ndarray          # [B, G + K, max_len]: the same tokens on the host, the greedy caption first if G = 1
    image_ids: np.ndarray     # [B]


class SelfCritical:
    def __init__(self, cfg, reward, *, rank: int, amp_dtype):
        self.cfg, self.reward = cfg.scst, reward
        self.seed, self.rank, self.amp_dtype = cfg.seed, rank, amp_dtype
        self.pad_id, self.bos_id, self.eos_id = Vocab.pad_id, Vocab.bos_id, Vocab.eos_id
        self._generators = {}
        self._bans = {}
        self._reset_stats()

    # ---- before the forward pass: samples (no gradient) -------------------------------------------------

    def prepare(self, model, batch, step: int, micro: int) -> ScstBatch:
        images = batch.images
        with autocast_context(images.device, self.amp_dtype):
            tokens = sample_captions(model, images, samples_per_image=self.cfg.samples, max_len=self.cfg.max_len,
                                     temperature=self.cfg.temperature, min_len=MIN_LEN,
                                     greedy=self.cfg.baseline == "greedy",
                                     generator=self._generator(images.device, step, micro))
        greedy = int(self.cfg.baseline == "greedy")
        bos = torch.full((*tokens.shape[:2], 1), self.bos_id, dtype=tokens.dtype, device=tokens.device)
        captions = torch.cat([bos, tokens], dim=2)[:, greedy:]
        return ScstBatch(images, captions, tokens.cpu().numpy(), batch.image_ids.cpu().numpy())

    # ---- while the device runs the forward pass: rewards on the host -----------------------------------------

    def advantages(self, batch: ScstBatch) -> torch.Tensor:
        """[B, K] reward - baseline, on the device. Called after the forward pass is queued, so the reward's CPU
        time overlaps the GPU's work instead of adding to it."""
        greedy = int(self.cfg.baseline == "greedy")
        rewards = self._rewards(batch.rows, batch.image_ids)
        advantages, baselines = self._advantages(rewards)
        self._add_stats(rewards[:, greedy:], baselines, advantages, batch.rows[:, greedy:])
        return torch.from_numpy(advantages).float().to(batch.captions.device)

    def _rewards(self, tokens: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
        B, rows, T = tokens.shape
        start = time.perf_counter()
        rewards = self.reward.score(tokens.reshape(B * rows, T), np.repeat(image_ids, rows), self.eos_id)
        self.stats["reward_time"] += time.perf_counter() - start
        return rewards.reshape(B, rows)

    def _advantages(self, rewards: np.ndarray):
        """rewards [B, G + K] (column 0 the greedy caption's when G = 1) -> advantages, baselines [B, K]."""
        if self.cfg.baseline == "greedy":
            samples = rewards[:, 1:]
            baselines = np.broadcast_to(rewards[:, :1], samples.shape)
        else:
            samples = rewards
            K = samples.shape[1]
            baselines = (samples.sum(axis=1, keepdims=True) - samples) / (K - 1)
        return samples - baselines, baselines

    def _generator(self, device: torch.device, step: int, micro: int) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        seed = np.random.SeedSequence([self.seed, step, self.rank, micro]).generate_state(1)[0]
        return self._generators[device].manual_seed(int(seed))

    # ---- the loss --------------------------------------------------------------------------------------------

    def loss_sum(self, logits: torch.Tensor, batch: ScstBatch) -> torch.Tensor:
        """logits [B, K, T, V] of the teacher-forced samples (maybe still being computed) -> the batch's loss sum."""
        return self.policy_loss_sum(logits, batch.captions, self.advantages(batch))

    def policy_loss_sum(self, logits: torch.Tensor, captions: torch.Tensor, advantages: torch.Tensor):
        """-sum over samples of advantage * log p(sample), log p under the sampler's rules (temperature, bans)."""
        tokens = captions[..., 1:]
        mask = tokens != self.pad_id
        logits = logits.float() / self.cfg.temperature + self._ban(*logits.shape[-2:], logits.device)
        logprobs = logits.log_softmax(dim=-1)
        picked = logprobs.gather(-1, tokens.masked_fill(~mask, self.eos_id).unsqueeze(-1)).squeeze(-1)
        sequence_logprob = (picked * mask).sum(dim=-1)
        with torch.no_grad():
            entropy = torch.special.entr(logprobs.exp()).sum(dim=-1)
            self.stats["entropy_sum"] += (entropy * mask).sum()
            self.stats["tokens"] += mask.sum()
        return -(advantages * sequence_logprob).sum()

    def _ban(self, T: int, V: int, device) -> torch.Tensor:
        """[T, V]: -inf where the sampler could not draw (pad, bos; eos before MIN_LEN), else 0."""
        key = (T, V, device)
        if key not in self._bans:
            ban = torch.zeros(T, V, device=device)
            ban[:, [self.pad_id, self.bos_id]] = float("-inf")
            ban[:MIN_LEN, self.eos_id] = float("-inf")
            self._bans[key] = ban
        return self._bans[key]

    # ---- statistics ---------------------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self.stats = {"reward_sum": 0.0, "baseline_sum": 0.0, "advantage_sum": 0.0, "advantage_sq": 0.0,
                      "length_sum": 0, "samples": 0, "reward_time": 0.0, "entropy_sum": 0.0, "tokens": 0}

    def _add_stats(self, rewards, baselines, advantages, samples: np.ndarray) -> None:
        from capfast.eval.cider import words_before

        s = self.stats
        s["reward_sum"] += float(rewards.sum())
        s["baseline_sum"] += float(baselines.sum())
        s["advantage_sum"] += float(advantages.sum())
        s["advantage_sq"] += float((advantages ** 2).sum())
        s["length_sum"] += int(words_before(samples.reshape(-1, samples.shape[-1]), self.eos_id).sum())
        s["samples"] += advantages.size

    def pop_stats(self) -> dict:
        """This rank's means over the step's samples, as TensorBoard scalars; resets the sums."""
        s, n = self.stats, max(self.stats["samples"], 1)
        mean_advantage = s["advantage_sum"] / n
        stats = {"scst/reward": s["reward_sum"] / n, "scst/baseline": s["baseline_sum"] / n,
                 "scst/advantage": mean_advantage,
                 "scst/advantage_std": max(s["advantage_sq"] / n - mean_advantage ** 2, 0.0) ** 0.5,
                 "scst/sample_len": s["length_sum"] / n,
                 "scst/entropy": s["entropy_sum"] / max(s["tokens"], 1),  # a tensor: read when logged
                 "scst/reward_ms": s["reward_time"] * 1e3}
        self._reset_stats()
        return stats


def build(cfg, data_dir, vocab, dist, amp_dtype) -> SelfCritical | None:
    """The SCST objective of a run (None for cross-entropy), with the reward tables of its training references
    (built by rank 0 first when they are not cached yet, so the other ranks read its cache)."""
    from capfast.eval.reward import load_reward
    from capfast.store.references import require_references

    if cfg.objective == "xe":
        return None
    require_references(data_dir, cfg.data.train_split, "SCST")  # on every rank, before any waits for rank 0
    if dist.enabled and not dist.is_main:
        _barrier()
    reward = load_reward(data_dir, cfg.data.train_split, vocab)
    if dist.enabled and dist.is_main:
        _barrier()
    return SelfCritical(cfg, reward, rank=dist.rank, amp_dtype=amp_dtype)


def _barrier() -> None:
    import torch.distributed

    torch.distributed.barrier()
