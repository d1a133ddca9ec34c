"""The cross-entropy method over action sequences: PlaNet's planner, written once for any dynamics.

`plan` searches the action sequences of a batch of start states at once: every candidate of every
start state is one row of one tensor (B, N, H, A), so a step of the dynamics is one batched call,
whether the dynamics are the learned latent model (the policy) or a known simulator (the planner
test on Pendulum's own equations). Candidates are drawn from a diagonal Gaussian per time step,
clipped to the action bounds, scored by the sum of predicted rewards, and the Gaussian is refit to
the `top_k` best; the refit mean after the last iteration is the plan.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Score = Callable[[Tensor], Tensor]  # candidates (B, N, H, A) in the bounds -> their returns (B, N)


def refit(candidates: Tensor, returns: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (B, H, A) of the `top_k` highest-return candidates of each start state.

    The standard deviation is the population one (divided by top_k), as the reference planner's moments.
    """
    best = returns.topk(top_k, dim=1).indices  # (B, K)
    elite = candidates.gather(1, best[:, :, None, None].expand(-1, -1, *candidates.shape[2:]))
    return elite.mean(1), elite.std(1, correction=0)


def plan(score: Score, batch: int, horizon: int, act_dim: int, *, iterations: int, candidates: int, top_k: int,
         low: float = -1.0, high: float = 1.0, generator: torch.Generator | None = None,
         device: torch.device | str = "cpu") -> Tensor:
    """The planned action sequences (B, H, A): the mean of the last refit, within [low, high].

    Starts from a zero mean and unit standard deviation (the reference planner keeps no plan from the
    previous step), draws `candidates` sequences per start state, clips them to the bounds, scores them
    and refits to the `top_k` best, `iterations` times.
    """
    if not 0 < top_k <= candidates:
        raise ValueError(f"top_k must be in 1..candidates ({candidates}), found {top_k}")
    mean = torch.zeros(batch, horizon, act_dim, device=device)
    std = torch.ones(batch, horizon, act_dim, device=device)
    for _ in range(iterations):
        noise = torch.randn(batch, candidates, horizon, act_dim, generator=generator, device=device)
        actions = (mean[:, None] + std[:, None] * noise).clamp(low, high)
        mean, std = refit(actions, score(actions), top_k)
    return mean
