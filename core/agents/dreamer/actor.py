"""The actor: features -> action distribution (one-hot categorical or bounded normal)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.dreamer.dists import BoundedNormal, OneHotDist, TanhNormal
from core.agents.dreamer.layers import MLP, scaled_linear
from core.agents.dreamer.onehot import OneHotCols
from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig


class Actor(nn.Module):
    def __init__(self, cfg: DreamerConfig, feat_dim: int, act: ActSpace, onehot: OneHotCols | None = None) -> None:
        super().__init__()
        self.act, self.unimix = act, cfg.unimix
        self.continuous = TanhNormal if cfg.actor_dist == "tanh_normal" else BoundedNormal
        self.net = MLP(feat_dim, cfg.ac_layers, cfg.units, cfg.norm, onehot, cfg.act)
        out = act.dim if act.discrete else 2 * act.dim
        self.out = scaled_linear(cfg.units, out, cfg.policy_out_scale)

    def forward(self, feat: Tensor) -> OneHotDist | BoundedNormal | TanhNormal:
        return self.dist(self.params(feat))

    def params(self, feat: Tensor) -> Tensor:
        """The network's raw output: the distribution's parameters (logits, or mean and std)."""
        return self.out(self.net(feat))

    # --- acting: the first layer split in two, so the deter part can run before the observation
    def deter_part(self, deter: Tensor) -> Tensor:
        """The first layer applied to the deter part of the features alone, with the layer's bias
        (the stoch part adds none)."""
        layer = self.net[0][0]
        return F.linear(deter, layer.weight[:, : deter.shape[-1]], layer.bias)

    def from_part(self, deter_part: Tensor, stoch: Tensor) -> OneHotDist | BoundedNormal | TanhNormal:
        """The distribution from `deter_part(deter)` and the flat stoch: `forward(feat)` up to
        float rounding (the first layer's sum is split in two)."""
        linear, norm, act = self.net[0]
        x = act(norm(deter_part + F.linear(stoch, linear.weight[:, linear.in_features - stoch.shape[-1]:])))
        for layer in list(self.net)[1:]:
            x = layer(x)
        return self.dist(self.out(x))

    def noise(self, n: int, device: torch.device | None = None) -> Tensor:
        """The random numbers `dist(out).rsample()` draws for `n` rows, drawn beforehand: a compiled
        step takes them as an input and samples exactly what the eager step would."""
        dist = OneHotDist if self.act.discrete else BoundedNormal
        return dist.noise((n, self.out.out_features), device)

    def dist(self, out: Tensor) -> OneHotDist | BoundedNormal | TanhNormal:
        """The action distribution of raw outputs `params(feat)` (any leading shape)."""
        return OneHotDist(out, self.unimix) if self.act.discrete else self.continuous(out)
