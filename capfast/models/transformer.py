"""Transformer caption decoder: pre-norm blocks of causal self-attention, cross-attention to the image, MLP.

Teacher forcing runs on tokens [B, K, L] (K captions per image) against memory [B, S, D] without copying the
memory K times: self-attention sees each caption alone ([B*K, L, D]), and cross-attention, which has no mask,
lets all K*L queries of an image attend to that image's memory at once ([B, K*L, D]).

Incremental generation keeps a cache: per layer the self-attention keys/values so far, and the cross-attention
keys/values computed once from the memory.
"""

import torch
import torch.nn.functional as F
from torch import nn

from capfast.errors import CapfastError


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[N, T, D] -> [N, H, T, D/H]"""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, H, T, D/H] -> [N, T, D]"""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def project(self, x):
        return (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention over x [N, L, D]."""
        q, k, v = self.project(x)
        p = self.dropout if self.training else 0.0
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)))

    def step(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """One new position x [N, 1, D] attending to itself and all cached ones; returns (out, keys, values)."""
        q, k, v = self.project(x)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        # No mask: the single query is the latest position (is_causal would align it with the first key).
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v))), k, v


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def memory_kv(self, memory: torch.Tensor):
        """memory [B, S, D] -> keys, values [B, H, S, D/H]"""
        return (split_heads(t, self.n_heads) for t in self.kv(memory).chunk(2, dim=-1))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] attends to its image's keys/values [B, H, S, D/H]."""
        q = split_heads(self.q(x), self.n_heads)
        p = self.dropout if self.training else 0.0
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p)))


class MLP(nn.Module):
    def __init__(self, d_model: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(d_model), SelfAttention(d_model, n_heads, dropout)
        self.norm2, self.cross_attn = nn.LayerNorm(d_model), CrossAttention(d_model, n_heads, dropout)
        self.norm3, self.mlp = nn.LayerNorm(d_model), MLP(d_model, ffn_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x [B, K, L, D], memory [B, S, D]"""
        B, K, L, D = x.shape
        x = x + self.drop(self.self_attn(self.norm1(x).reshape(B * K, L, D))).view(B, K, L, D)
        k, v = self.cross_attn.memory_kv(memory)
        x = x + self.drop(self.cross_attn(self.norm2(x).reshape(B, K * L, D), k, v)).view(B, K, L, D)
        return x + self.mlp(self.norm3(x))

    def step(self, x: torch.Tensor, cache: dict, i: int) -> torch.Tensor:
        """x [N, 1, D]; updates this layer's entries of `cache` in place."""
        h, cache[f"self_k{i}"], cache[f"self_v{i}"] = self.self_attn.step(
            self.norm1(x), cache[f"self_k{i}"], cache[f"self_v{i}"])
        x = x + h
        x = x + self.cross_attn(self.norm2(x), cache[f"cross_k{i}"], cache[f"cross_v{i}"])
        return x + self.mlp(self.norm3(x))


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, ffn_mult: int,
                 dropout: float, max_positions: int, tie_weights: bool):
        super().__init__()
        if d_model % n_heads:
            raise CapfastError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.max_positions = max_positions
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_positions, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(init_weights)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise CapfastError(f"caption of {length} tokens exceeds the decoder's max_positions={self.max_positions}")

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, L], memory [B, S, D] -> logits [B, K, L, V]"""
        self.check_length(tokens.shape[-1])
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x, memory)
        return self.head(self.norm(x))

    def init_cache(self, memory: torch.Tensor) -> dict:
        """Cache for `step`, every tensor with the N generation rows first (memory [N, S, D])."""
        cache = {}
        for i, block in enumerate(self.blocks):
            cache[f"cross_k{i}"], cache[f"cross_v{i}"] = block.cross_attn.memory_kv(memory)
            empty = cache[f"cross_k{i}"][:, :, :0]
            cache[f"self_k{i}"], cache[f"self_v{i}"] = empty, empty
        return cache

    def step(self, tokens: torch.Tensor, cache: dict, position: int):
        """tokens [N] at `position` -> (logits [N, V], cache)."""
        self.check_length(position + 1)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb.weight[position]).unsqueeze(1)
        cache = dict(cache)
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache, i)
        return self.head(self.norm(x)).squeeze(1), cache


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
