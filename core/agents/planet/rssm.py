"""PlaNet's recurrent state-space model: Dreamer's RSSM (`core.agents.dreamer.rssm`) with Gaussian latents.

The recurrence (the GRU step, the posterior's first layer split into its deter and embedding halves, the
open-loop rollout) is Dreamer's, inherited; what differs is the latent: `stoch` Gaussians whose mean and
standard deviation (softplus + `min_std`) the prior and posterior output, sampled with the
reparameterisation trick, and the KL between two diagonal Gaussians.

State = {"deter": (B, D), "stoch": (B, S) a sample, "mean", "std": (B, S)}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.agents.dreamer.rssm import RSSM, State
from core.config.agent import DreamerConfig


def gaussian_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    """KL(p || q) of diagonal Gaussians, per dimension."""
    return torch.log(std_q / std_p) + (std_p.square() + (mean_p - mean_q).square()) / (2 * std_q.square()) - 0.5


class GaussianRSSM(RSSM):
    ONEHOT = False

    def __init__(self, cfg: DreamerConfig, act_dim: int, embed_dim: int, min_std: float) -> None:
        super().__init__(cfg, act_dim, embed_dim)
        self.min_std = min_std

    def latent_widths(self) -> tuple[int, int]:
        """A sample of `stoch` values; its distribution is a mean and a standard deviation per value."""
        return self.stoch, 2 * self.stoch

    def initial(self, batch: int, device: torch.device) -> State:
        return {"deter": torch.zeros(batch, self.deter, device=device),
                "stoch": torch.zeros(batch, self.stoch, device=device)}

    @staticmethod
    def feat(state: State) -> Tensor:
        return torch.cat([state["deter"], state["stoch"].to(state["deter"].dtype)], -1)

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

    # --- one step
    def img_step(self, state: State, action: Tensor, noise: Tensor | None = None) -> State:
        """Prior: the next state predicted from the state and action alone, sampled (`noise`: its standard
        normal draws, else drawn here)."""
        deter = self._gru(state["deter"], state["stoch"], action)
        prior = self.prior(deter)
        return self._sample(deter, prior["mean"], prior["std"], noise)

    def observed_deter(self, state: State, prev_action: Tensor, is_first: Tensor) -> Tensor:
        """The GRU step of an observed step; `is_first` resets state and previous action first."""
        keep = (1.0 - is_first.float())[:, None]
        return self._gru(state["deter"] * keep, state["stoch"] * keep, prev_action * keep)

    def post_from_parts(self, deter: Tensor, deter_part: Tensor, embed_part: Tensor,
                        noise: Tensor | None = None) -> State:
        _, norm, act = self.post_net
        return self._sample(deter, *self._dist(self.post_out(act(norm(deter_part + embed_part)))), noise)

    def obs_step(self, state: State, prev_action: Tensor, embed: Tensor, is_first: Tensor) -> tuple[State, State]:
        post = self._post_step(state, prev_action, self.post_embed_part(embed), is_first)
        return post, self.prior(post["deter"])

    # --- sequences
    def observe(self, embed: Tensor, prev_action: Tensor, is_first: Tensor, state: State) -> tuple[State, State]:
        """Roll the posterior over (B, T) inputs; stacked (B, T, ...) posteriors and their priors."""
        embed_parts = self.post_embed_part(embed).unbind(1)
        actions, firsts = prev_action.unbind(1), is_first.unbind(1)
        posts = []
        for t in range(len(embed_parts)):
            state = self._post_step(state, actions[t], embed_parts[t], firsts[t])
            posts.append(state)
        post = {k: torch.stack([s[k] for s in posts], 1) for k in posts[0]}
        return post, self.prior(post["deter"])

    # --- losses
    def kl(self, post: State, prior: State) -> Tensor:
        """KL(posterior || prior) summed over the latents, per leading position."""
        return gaussian_kl(post["mean"], post["std"], prior["mean"], prior["std"]).sum(-1)

    def kl_loss(self, post: State, prior: State) -> Tensor:
        """The KL with free nats: no gradient while it is below `free_nats` (per leading position)."""
        return torch.clamp(self.kl(post, prior), min=self.cfg.free_nats)
