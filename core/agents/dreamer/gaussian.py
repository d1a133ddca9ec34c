"""The RSSM with Gaussian latents: Dreamer v1's (`dreamer.latent: gaussian`) and PlaNet's.

The recurrence (the GRU step, the posterior's first layer split into its deter and embedding halves, the
observe loop, the open-loop rollout) is the RSSM's, inherited; what differs is the latent: `stoch`
Gaussians whose mean and standard deviation (softplus + `min_std`, 0.1 in both papers) the prior and
posterior output, sampled with the reparameterisation trick, and the KL between two diagonal Gaussians.

State = {"deter": (B, D), "stoch": (B, S) a sample, "mean", "std": (B, S)}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from core.agents.dreamer.rssm import RSSM, State, free_nats
from core.config.agent import DreamerConfig


def gaussian_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    """KL(p || q) of diagonal Gaussians, per dimension."""
    return torch.log(std_q / std_p) + (std_p.square() + (mean_p - mean_q).square()) / (2 * std_q.square()) - 0.5


class GaussianRSSM(RSSM):
    ONEHOT = False

    def __init__(self, cfg: DreamerConfig, act_dim: int, embed_dim: int) -> None:
        super().__init__(cfg, act_dim, embed_dim)
        self.min_std = cfg.min_std

    def latent_widths(self) -> tuple[int, int]:
        """A sample of `stoch` values; its distribution is a mean and a standard deviation per value."""
        return self.stoch, 2 * self.stoch

    def initial(self, batch: int, device: torch.device) -> State:
        return {"deter": torch.zeros(batch, self.deter, device=device),
                "stoch": torch.zeros(batch, self.stoch, device=device)}

    @staticmethod
    def feat(state: State) -> Tensor:
        return torch.cat([state["deter"], state["stoch"].to(state["deter"].dtype)], -1)

    def sample_noise(self, shape: torch.Size | tuple[int, ...], device: torch.device | None = None) -> Tensor:
        """The standard normals a sample of latents of `shape` draws."""
        return torch.randn(tuple(shape), device=device)

    # --- distributions
    def _dist(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = params.float().chunk(2, -1)
        return mean, F.softplus(std) + self.min_std

    @staticmethod
    def _sample(deter: Tensor, mean: Tensor, std: Tensor, noise: Tensor | None = None) -> State:
        noise = torch.randn_like(mean) if noise is None else noise
        return {"deter": deter, "stoch": mean + std * noise, "mean": mean, "std": std}

    def prior(self, deter: Tensor) -> State:
        """The prior's mean and standard deviation given the deterministic state (any leading axes)."""
        mean, std = self._dist(self.prior_out(self.prior_net(deter)))
        return {"deter": deter, "mean": mean, "std": std}

    def dist_params(self, state: State) -> Tensor:
        return torch.cat([state["mean"], state["std"]], -1)

    def with_dist(self, state: State, params: Tensor) -> State:
        mean, std = params.chunk(2, -1)
        return {**state, "mean": mean, "std": std}

    # --- one step
    def img_step(self, state: State, action: Tensor, noise: Tensor | None = None) -> State:
        """Prior: the next state predicted from the state and action alone, sampled (`noise`: its standard
        normal draws, else drawn here)."""
        deter = self._gru(state["deter"], state["stoch"], action)
        prior = self.prior(deter)
        return self._sample(deter, prior["mean"], prior["std"], noise)

    def post_from_parts(self, deter: Tensor, deter_part: Tensor, embed_part: Tensor,
                        noise: Tensor | None = None) -> State:
        _, norm, act = self.post_net
        return self._sample(deter, *self._dist(self.post_out(act(norm(deter_part + embed_part)))), noise)

    # --- losses
    def kl(self, post: State, prior: State) -> Tensor:
        """KL(posterior || prior) summed over the latents, per leading position."""
        return gaussian_kl(post["mean"], post["std"], prior["mean"], prior["std"]).sum(-1)

    def entropy(self, state: State) -> Tensor:
        """The entropy of a state's Gaussians, averaged over the latents."""
        return (0.5 * math.log(2 * math.pi * math.e) + torch.log(state["std"])).mean(-1)

    def kl_loss(self, post: State, prior: State) -> Tensor:
        """PlaNet's one KL term (gradients to both sides) with free nats (`dreamer.free_nats_placement`)."""
        return free_nats(self.kl(post, prior), self.cfg.free_nats, self.cfg.free_nats_placement)
