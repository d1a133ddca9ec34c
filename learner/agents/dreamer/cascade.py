"""CASCADE's diversity term (Xu et al. 2022, "Learning General World Models in a Handful of Reward-Free
Deployments"), written from the paper.

The explorers of a population are trained one after another; explorer k is rewarded for imagined final
states unlike those the explorers before it reach, so that together they collect diverse data rather
than N copies of one explorer's. Here the diversity of one of explorer k's final states is its distance to
the nearest final state of explorers 0..k-1 (imagined from the same replayed start states): it depends on
the earlier explorers by construction, and is zero where explorer k goes exactly where one of them goes.
The earlier explorers' states are constants to explorer k (no gradient reaches them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MAX_REFERENCE = 4096  # earlier final states compared against (an evenly spaced subset beyond this)


def diversity(final: Tensor, previous: Sequence[Tensor]) -> Tensor:
    """Per row of `final` (N, D): the Euclidean distance to the nearest row of the earlier explorers' final
    states `previous` (each (M, D)), zero when there are none. Differentiable in `final` only."""
    if not previous:
        return torch.zeros(final.shape[0], device=final.device, dtype=final.dtype)
    reference = torch.cat([p.detach().reshape(-1, final.shape[-1]) for p in previous], 0).to(final.dtype)
    if reference.shape[0] > MAX_REFERENCE:
        step = reference.shape[0] // MAX_REFERENCE + 1
        reference = reference[::step]
    # squared distances as one product; the clamp keeps the sqrt's gradient finite at zero distance
    sq = (final.square().sum(-1, keepdim=True) - 2 * final @ reference.T + reference.square().sum(-1)[None])
    return sq.min(-1).values.clamp(min=1e-8).sqrt()
