"""Rollouts inside M: the whole CMA-ES population's rollouts as one batch through the LSTM, no process pool.

Candidate p's R rollouts are rows p*R .. p*R + R - 1 of one (P x R)-row batch; each step is one batched
controller product, one LSTM step and one head for every row. All candidates start from the same R real
states and share the step noise (common random numbers), so their fitness differs by their weights, not by
their luck. A rollout ends at `horizon` or when M's done head says so (sampled); rewards after that are 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from core.agents.world_models import controller
from core.agents.world_models.memory import State
from learner.agents.world_models.mdn_rnn import MDNRNN, mdn_sample


class Dream(NamedTuple):
    returns: Tensor  # (P, R): summed predicted rewards
    lengths: Tensor  # (P, R): steps before the episode ended in the dream (horizon if it did not)


@torch.no_grad()
def dream(mdn: MDNRNN, params: Tensor, z0: Tensor, state0: State, horizon: int, tau: float, discrete: bool,
          generator: torch.Generator | None = None) -> Dream:
    """Roll out P controllers (`params` (P, n)) from R start states (`z0` (R, z), `state0` (h, c) each (R, units))
    for `horizon` steps at temperature `tau`."""
    p, r = params.shape[0], z0.shape[0]
    features = z0.shape[1] + mdn.memory.units
    act_dim = params.shape[1] // (features + 1)  # C has (features + 1) x act parameters
    weight, bias = controller.split(params, features, act_dim)
    z = z0.repeat(p, 1)
    h, c = state0[0].repeat(p, 1), state0[1].repeat(p, 1)
    alive = torch.ones(p * r, device=z0.device)
    returns = torch.zeros(p * r, device=z0.device)
    lengths = torch.zeros(p * r, device=z0.device)
    for _ in range(horizon):
        action = controller.act(torch.cat([z, h], -1).reshape(p, r, -1), weight, bias, discrete).reshape(p * r, act_dim)
        h, c = mdn.memory(z, action, (h, c))
        mix, reward, done_logit = mdn.heads(h)
        returns += alive * reward
        lengths += alive
        uniform = torch.rand(r, z0.shape[1], generator=generator, device=z0.device).repeat(p, 1)
        normal = torch.randn(r, z0.shape[1], generator=generator, device=z0.device).repeat(p, 1)
        ends = torch.rand(r, generator=generator, device=z0.device).repeat(p) < torch.sigmoid(done_logit)
        z = mdn_sample(mix, tau, uniform, normal)
        alive = alive * (~ends).float()
        if not bool(alive.any()):
            break
    return Dream(returns.reshape(p, r), lengths.reshape(p, r))
