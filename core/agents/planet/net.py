"""The networks PlaNet acts with: encoder, Gaussian-latent RSSM and reward head, built from Dreamer's blocks.

PlaNet's architecture is Dreamer's ancestor, so its parts are Dreamer's building blocks at PlaNet's sizes:
the 2023 recipe's LayerNorm GRU (one block) and 4x4 stride-2 CNN (PlaNet's 32-64-128-256 channels at
`cnn_depth` 32), with LayerNorm + SiLU where PlaNet used ELU. `blocks_config` says which values they read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.agents.dreamer.codec import Encoder
from core.agents.dreamer.gaussian import GaussianRSSM, State
from core.agents.dreamer.layers import MLP
from core.agents.dreamer.preprocess import ObsKeys
from core.agents.spaces import ActSpace, ObsSpace
from core.config.agent import DreamerConfig
from core.config.planet import PlanetConfig
from core.layout import StepLayout

ALGORITHM = "planet"  # its name in the registry, the config and a policy blob


def blocks_config(cfg: PlanetConfig) -> DreamerConfig:
    """The config Dreamer's encoder, decoder, MLPs and RSSM read, at PlaNet's sizes (2023 recipe blocks)."""
    return DreamerConfig(recipe="2023", size="tiny", deter=cfg.deter, hidden=cfg.hidden, stoch=cfg.stoch,
                         units=cfg.units, mlp_layers=cfg.mlp_layers, head_layers=cfg.head_layers,
                         cnn_depth=cfg.cnn_depth, cnn_mults=list(cfg.cnn_mults), image_keys=cfg.image_keys,
                         vector_keys=cfg.vector_keys, free_nats=cfg.free_nats, gru_blocks=1,
                         latent="gaussian", min_std=cfg.min_std, free_nats_placement=cfg.free_nats_placement)


def continuous_problem(act: ActSpace) -> str | None:
    """Why PlaNet cannot act in `act`, else None: the CEM plans with Gaussians over continuous actions."""
    if act.discrete:
        return (f"planet plans continuous actions with the cross-entropy method; this task's actions are "
                f"{act.dim} discrete choices (train it with agent: dreamer)")
    return None


class RewardHead(nn.Module):
    """Features [deter, stoch] -> the predicted reward (the mean of a unit-variance Gaussian)."""

    def __init__(self, blocks: DreamerConfig, feat_dim: int) -> None:
        super().__init__()
        self.net = MLP(feat_dim, blocks.head_layers, blocks.units, blocks.norm)
        self.out = nn.Linear(blocks.units, 1)

    def forward(self, feat: Tensor) -> Tensor:
        return self.out(self.net(feat)).squeeze(-1).float()


class PlanetNet(nn.Module):
    """What acting needs: the encoder, the RSSM and the reward head (the trainer's model adds the decoder)."""

    def __init__(self, cfg: PlanetConfig, space: ObsSpace, act: ActSpace) -> None:
        super().__init__()
        if why := continuous_problem(act):
            raise ValueError(why)
        self.cfg, self.blocks = cfg, blocks_config(cfg)
        self.space, self.act_space = StepLayout.of(space), act
        self.keys = ObsKeys.select(space, cfg.image_keys, cfg.vector_keys)
        self.encoder = Encoder(self.blocks, space, self.keys)
        self.rssm = GaussianRSSM(self.blocks, act.dim, self.encoder.out_dim)
        self.feat_dim = cfg.deter + cfg.stoch
        self.reward = RewardHead(self.blocks, self.feat_dim)

    def imagined_returns(self, start: State, actions: Tensor, repeat: int) -> Tensor:
        """The summed predicted rewards (B, N) of candidate action sequences (B, N, H, A) from start states (B, ...),
        each action held `repeat` steps: one batched rollout of the prior for all B x N candidates."""
        b, n, h, a = actions.shape
        state = {k: start[k].repeat_interleave(n, 0) for k in ("deter", "stoch")}
        steps = actions.reshape(b * n, h, a).repeat_interleave(repeat, 1).unbind(1)
        feats = []
        for action in steps:
            state = self.rssm.img_step(state, action)
            feats.append(self.rssm.feat(state))
        return self.reward(torch.stack(feats)).sum(0).reshape(b, n)  # the reward head once over all steps
