"""C: the linear controller a = tanh(W [z, h] + b), one flat parameter vector as CMA-ES sees it.

Car racing: (32 + 256) x 3 + 3 = 867 parameters. The same arithmetic acts for one robot (a vector of
parameters) and for a whole population in the dream (P vectors, each driving its own rows of one batch).
Discrete actions take the argmax of W [z, h] + b as a one-hot.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def parameter_count(z: int, units: int, act_dim: int) -> int:
    return (z + units) * act_dim + act_dim


def split(params: Tensor, features: int, act_dim: int) -> tuple[Tensor, Tensor]:
    """(P, n) or (n,) flat parameters -> W (P, features, act) and b (P, act) (batch axis kept if given)."""
    weight = params[..., : features * act_dim].reshape(*params.shape[:-1], features, act_dim)
    return weight, params[..., features * act_dim:]


def act(features: Tensor, weight: Tensor, bias: Tensor, discrete: bool) -> Tensor:
    """Actions for features (N, F) with one controller (W (F, A), b (A,)), or for a population: features
    (P, R, F) with W (P, F, A) and b (P, A), each candidate acting on its own R rows."""
    out = features @ weight + bias if weight.ndim == 2 else torch.baddbmm(bias[:, None, :], features, weight)
    if discrete:
        return F.one_hot(out.argmax(-1), out.shape[-1]).to(out.dtype)
    return torch.tanh(out)
