"""A pre-norm causal self-attention block with a KV cache, shared by every transformer of the agents (Gato's
policy, the transformer world model of Dreamer). Attention is `torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KV = tuple[Tensor, Tensor]


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, cache: KV | None = None, mask: Tensor | None = None) -> tuple[Tensor, KV]:
        """x (B, L, W): causal over its own slots; with `cache` (the keys and values of slots before x) x
        also sees every cached slot. `mask`: instead of that causal mask, the caller's own (bool: may attend,
        or additive float), broadcastable to (B, heads, L, cached + L). Returns the output and the keys and
        values so far."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = torch.cat([cache[0].to(k.dtype), k], 2), torch.cat([cache[1].to(v.dtype), v], 2)
        if mask is not None:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask.dtype == torch.bool
                                                 else mask.to(q.dtype))
        elif cache is None or n > 1:
            past = k.shape[2] - n  # query i (at past + i) sees keys 0 .. past + i
            causal = torch.ones(n, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=None if past == 0 else causal,
                                                 is_causal=past == 0)
        else:
            att = F.scaled_dot_product_attention(q, k, v)  # one new slot sees everything before it
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x)), (k, v)
