"""Show, Attend and Tell decoder: an LSTMCell fed the previous word and a gated soft-attention image context.

Teacher forcing runs on tokens [B, K, L] against memory [B, S, D]: the attention broadcasts each image's
projected memory over its K captions instead of copying it.
"""

import torch
from torch import nn


class AdditiveAttention(nn.Module):
    """Bahdanau attention: score(h, m) = w . tanh(W_m m + W_h h)."""

    def __init__(self, memory_dim: int, hidden: int, attn_dim: int):
        super().__init__()
        self.memory_proj = nn.Linear(memory_dim, attn_dim)
        self.hidden_proj = nn.Linear(hidden, attn_dim)
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, memory: torch.Tensor, memory_keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """memory [B, S, D], memory_keys = memory_proj(memory) [B, S, A], h [B, K, H] -> context [B, K, D]"""
        energy = torch.tanh(memory_keys.unsqueeze(1) + self.hidden_proj(h).unsqueeze(2))  # [B, K, S, A]
        weights = self.score(energy).squeeze(-1).softmax(dim=-1)  # [B, K, S]
        return weights.to(memory.dtype) @ memory


class LSTMDecoder(nn.Module):
    def __init__(self, vocab_size: int, memory_dim: int, embed_dim: int, hidden: int, attn_dim: int,
                 dropout: float, tie_weights: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(memory_dim, hidden)
        self.init_c = nn.Linear(memory_dim, hidden)
        self.attention = AdditiveAttention(memory_dim, hidden, attn_dim)
        self.gate = nn.Linear(hidden, memory_dim)  # the paper's beta: how much image context to let in
        self.cell = nn.LSTMCell(embed_dim + memory_dim, hidden)
        self.drop = nn.Dropout(dropout)
        # Tying needs the head's input to live in the embedding space, hence a projection to embed_dim.
        self.out_proj = nn.Linear(hidden, embed_dim) if tie_weights else nn.Identity()
        self.head = nn.Linear(embed_dim if tie_weights else hidden, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight

    def initial_hidden(self, memory: torch.Tensor):
        mean = memory.mean(dim=1)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def cell_step(self, word: torch.Tensor, h, c, memory, memory_keys):
        """word [B, K, E], h/c [B*K, H] -> new h, c"""
        B, K = word.shape[:2]
        context = self.attention(memory, memory_keys, h.view(B, K, -1))
        gated = torch.sigmoid(self.gate(h)).view(B, K, -1) * context
        return self.cell(torch.cat([word, gated], dim=-1).flatten(0, 1), (h, c))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.out_proj(self.drop(h)))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, L], memory [B, S, D] -> logits [B, K, L, V]"""
        B, K, L = tokens.shape
        h, c = (t.repeat_interleave(K, dim=0) for t in self.initial_hidden(memory))
        memory_keys = self.attention.memory_proj(memory)
        words = self.drop(self.embed(tokens))
        outputs = []
        for t in range(L):  # L is a shape, so torch.compile unrolls this loop
            h, c = self.cell_step(words[:, :, t], h, c, memory, memory_keys)
            outputs.append(h)
        return self.logits(torch.stack(outputs, dim=1)).view(B, K, L, -1)

    def init_cache(self, memory: torch.Tensor) -> dict:
        """Cache for `step`, every tensor with the N generation rows first (memory [N, S, D])."""
        h, c = self.initial_hidden(memory)
        return {"h": h, "c": c, "memory": memory, "memory_keys": self.attention.memory_proj(memory)}

    def step(self, tokens: torch.Tensor, cache: dict, position: int):
        """tokens [N] -> (logits [N, V], cache); `position` is unused (the LSTM state carries it)."""
        word = self.drop(self.embed(tokens)).unsqueeze(1)
        h, c = self.cell_step(word, cache["h"], cache["c"], cache["memory"], cache["memory_keys"])
        return self.logits(h), {**cache, "h": h, "c": c}
