"""The actor: features -> action distribution (one-hot categorical or bounded normal)."""

from __future__ import annotations

from torch import Tensor, nn

from learner.config_agent import DreamerConfig
from learner.dreamer.dists import BoundedNormal, OneHotDist
from learner.dreamer.layers import MLP, scaled_linear
from learner.dreamer.preprocess import ActSpace


class Actor(nn.Module):
    def __init__(self, cfg: DreamerConfig, feat_dim: int, act: ActSpace) -> None:
        super().__init__()
        self.act, self.unimix = act, cfg.unimix
        self.net = MLP(feat_dim, cfg.ac_layers, cfg.units, cfg.norm)
        out = act.dim if act.discrete else 2 * act.dim
        self.out = scaled_linear(cfg.units, out, cfg.policy_out_scale)

    def forward(self, feat: Tensor) -> OneHotDist | BoundedNormal:
        out = self.out(self.net(feat))
        return OneHotDist(out, self.unimix) if self.act.discrete else BoundedNormal(out)
