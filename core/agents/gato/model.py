"""Gato's network: token and patch embeddings, a decoder-only transformer, logits over the vocabulary.

A sequence is steps of one task laid end to end (a prompt's steps first when there is one). Each slot gets
its token's embedding, or at an image patch the patch's embedding (a ResNet v2 block on the 16 x 16 patch,
normalised to [-1, 1] and divided by sqrt(16) = 4, plus learned row and column encodings), then a learned
local position (its index within the step: which entry of the body it is) and a learned global position.
Attention is causal (`scaled_dot_product_attention`); slot i's logits predict slot i+1's token, so the loss
reads the logits before every action slot. Acting decodes an action's tokens one by one with a KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.attention import KV, Block
from core.agents.gato.tokens import Body, Vocabulary
from core.config.gato import GatoConfig


class Packed(NamedTuple):
    """A batch of token sequences, padded to one length (padding sits at the end: causal attention keeps it
    from touching what comes before)."""

    tokens: Tensor  # (B, L) int64; 0 at patch and padding slots
    local: Tensor  # (B, L) int64: index within the step
    patch_mask: Tensor  # (B, L) bool: slots filled by an image patch
    patches: Tensor  # (N, p, p, 3) uint8: the patches, in the row-major order of patch_mask
    patch_rc: Tensor  # (N, 2) int64: each patch's row and column in its image
    action: Tensor  # (B, L) bool: action slots (the loss targets)
    lengths: Tensor  # (B,) int64: slots before the padding


Segment = tuple[Body, np.ndarray, np.ndarray]  # (body, tokens (T, S'), patches (T, P, p, p, 3)) of one task


def pack(rows: Sequence[Sequence[Segment]], device: torch.device | str = "cpu", length: int | None = None) -> Packed:
    """Sequences of segments (each T steps of one body; a last step may stop after its separator or inside
    its action: S' <= S) as one padded batch."""
    tokens, local, pmask, action, patches, rc, lengths = [], [], [], [], [], [], []
    for row in rows:
        parts: list[tuple[np.ndarray, ...]] = []
        for body, tok, pat in row:
            t, s = tok.shape
            slots = body.patch_slots()
            is_patch = np.zeros(body.step_len, bool)
            is_patch[slots] = True
            is_action = np.zeros(body.step_len, bool)
            is_action[body.action_slots()] = True
            parts.append((tok.reshape(-1), np.tile(np.arange(s), t), np.tile(is_patch[:s], t),
                          np.tile(is_action[:s], t)))
            patches.append(pat.reshape(-1, *pat.shape[2:]))
            rc.append(np.tile(body.patch_grid(), (t, 1)))
        row_arrays = [np.concatenate(p) if parts else np.zeros(0) for p in zip(*parts, strict=True)]
        lengths.append(len(row_arrays[0]))
        tokens.append(row_arrays[0])
        local.append(row_arrays[1])
        pmask.append(row_arrays[2])
        action.append(row_arrays[3])
    size = max(lengths) if length is None else length
    if max(lengths) > size:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in {size}")

    def padded(arrays: list[np.ndarray], dtype: torch.dtype) -> Tensor:
        out = np.zeros((len(arrays), size), np.int64)
        for i, a in enumerate(arrays):
            out[i, : len(a)] = a
        return torch.as_tensor(out, device=device).to(dtype)

    p = rows[0][0][0].patch if rows and rows[0] else 16
    all_patches = np.concatenate(patches) if patches else np.zeros((0, p, p, 3), np.uint8)
    all_rc = np.concatenate(rc) if rc else np.zeros((0, 2), np.int64)
    return Packed(padded(tokens, torch.int64), padded(local, torch.int64), padded(pmask, torch.bool),
                  torch.as_tensor(all_patches, device=device), torch.as_tensor(all_rc, device=device),
                  padded(action, torch.bool), torch.as_tensor(lengths, device=device))


class PatchEmbed(nn.Module):
    """A ResNet v2 block (pre-activation, group norm) on one patch, then a linear map to the width."""

    def __init__(self, patch: int, channels: int, width: int) -> None:
        super().__init__()
        self.patch = patch
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(min(8, channels), channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, channels), channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.out = nn.Linear(channels * 16, width)

    def forward(self, patches: Tensor) -> Tensor:
        """(N, p, p, 3) uint8 -> (N, width)."""
        x = patches.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = self.stem(x / math.sqrt(self.patch))  # [-1, 1] / sqrt(patch size), as Gato normalises patches
        h = self.conv1(F.gelu(self.norm1(x)))
        x = x + self.conv2(F.gelu(self.norm2(h)))
        return self.out(self.pool(x).flatten(1))


class GatoNet(nn.Module):
    """Embeddings, decoder blocks and the logits over the whole vocabulary."""

    def __init__(self, cfg: GatoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        vocab = Vocabulary.of(cfg).size
        self.token = nn.Embedding(vocab, cfg.width)
        self.patch = PatchEmbed(cfg.patch, cfg.patch_channels, cfg.width)
        self.patch_row = nn.Embedding(cfg.max_patch_side, cfg.width)
        self.patch_col = nn.Embedding(cfg.max_patch_side, cfg.width)
        self.local = nn.Embedding(cfg.step_tokens, cfg.width)
        self.position = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab)
        self.apply(_init)

    def embed(self, batch: Packed, start: int = 0) -> Tensor:
        """(B, L, W) inputs of the transformer; `start`: the global position of the first slot."""
        x = self.token(batch.tokens)
        if batch.patches.shape[0]:
            rc = batch.patch_rc
            patch = self.patch(batch.patches) + self.patch_row(rc[:, 0]) + self.patch_col(rc[:, 1])
            x = x.masked_scatter(batch.patch_mask[..., None], patch.to(x.dtype))
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        return x + self.local(batch.local) + self.position(positions)

    def forward(self, batch: Packed, cache: list[KV] | None = None, start: int = 0) -> tuple[Tensor, list[KV]]:
        """Logits (B, L, V) of every slot, and the KV cache (pass it back with `start` = slots so far to
        continue the sequence one slot at a time)."""
        if start + batch.tokens.shape[1] > self.cfg.context:
            raise ValueError(f"a sequence of {start + batch.tokens.shape[1]} slots is longer than gato.context "
                             f"({self.cfg.context})")
        x = self.embed(batch, start)
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, None if cache is None else cache[i])
            kv.append(layer_kv)
        return self.head(self.norm(x)), kv


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def action_loss(logits: Tensor, batch: Packed) -> Tensor:
    """Cross-entropy of the action slots only: the logits at slot i predict slot i+1's token, and only where
    slot i+1 is an action does it count (observations, separators, patches and padding do not)."""
    target = batch.action[:, 1:]
    picked = logits[:, :-1][target]
    if picked.shape[0] == 0:
        raise ValueError("a batch without a single action slot: nothing to learn")
    return F.cross_entropy(picked.float(), batch.tokens[:, 1:][target])
