"""PlaNet's trainable model and its loss: the acting networks plus the observation decoder.

Loss per (batch, time), as the official code: the Gaussian log-likelihoods (unit variance) of the
observation and of the reward (scaled by `reward_scale`, 10), and KL(posterior || prior) summed over the
latents with free nats (no gradient below `free_nats`, 3). Latent overshooting (`overshooting` D > 1) adds
the KL of priors rolled 2..D steps open-loop from the posteriors against the (fixed) posteriors they reach.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.agents.dreamer.codec import Decoder
from core.agents.dreamer.dists import symlog
from core.agents.dreamer.gaussian import State
from core.agents.dreamer.layers import init_params_
from core.agents.planet.net import PlanetNet
from core.agents.spaces import ActSpace, ObsSpace
from core.config.planet import PlanetConfig


class PlanetModel(PlanetNet):
    """Every trainable weight: the encoder, RSSM and reward head a policy carries, and the decoder."""

    def __init__(self, cfg: PlanetConfig, space: ObsSpace, act: ActSpace) -> None:
        super().__init__(cfg, space, act)
        self.decoder = Decoder(self.blocks, space, self.keys, self.feat_dim)
        init_params_(self, self.blocks.init_fan)

    def observe(self, data: dict[str, Tensor]) -> tuple[State, State, Tensor]:
        """Posteriors and priors (B, T, ...) of a replayed batch, and the actions that led into each step.

        A sequence starts from the zero state (PlaNet keeps no replay context); step t is driven by the action
        taken at t-1, and `is_first` resets state and action where an episode starts inside the sequence."""
        b = data["action"].shape[0]
        prev_action = torch.cat([torch.zeros_like(data["action"][:, :1]), data["action"][:, :-1]], 1)
        start = self.rssm.initial(b, prev_action.device)
        post, prior = self.rssm.observe(self.encoder(data), prev_action, data["is_first"], start)
        return post, prior, prev_action

    def loss(self, data: dict[str, Tensor]) -> tuple[Tensor, State, dict[str, Tensor]]:
        """The mean loss of a batch, the posteriors and metrics."""
        cfg = self.cfg
        post, prior, prev_action = self.observe(data)
        feat = self.rssm.feat(post)
        recon = self.decoder(feat)
        parts: dict[str, Tensor] = {}
        for key in self.keys.images:
            parts[f"image/{key}"] = 0.5 * (recon[key].float() - data[key]).square().sum((-3, -2, -1))
        for key in self.keys.vectors:
            target = symlog(data[key].reshape(*data[key].shape[:2], -1))
            parts[f"vector/{key}"] = 0.5 * (recon[key].float() - target).square().sum(-1)
        dec = sum(parts.values())
        reward = 0.5 * (self.reward(feat) - data["reward"]).square()
        kl = self.rssm.kl_loss(post, prior)
        total = cfg.dec_scale * dec + cfg.reward_scale * reward + cfg.kl_scale * kl
        loss = total.mean()
        metrics = {f"wm/{k}": v.detach().mean() for k, v in parts.items()}
        if cfg.overshooting > 1:
            over = overshooting_kl(self, post, prev_action, data["is_first"], cfg.overshooting)
            loss = loss + cfg.overshooting_scale * over
            metrics["wm/overshooting"] = over.detach()
        with torch.no_grad():
            metrics.update({"wm/dec": dec.mean(), "wm/reward": reward.mean(), "wm/kl": self.rssm.kl(post, prior).mean(),
                            "wm/prior_std": prior["std"].mean(), "wm/post_std": post["std"].mean()})
        return loss, post, metrics


def overshooting_kl(model: PlanetNet, post: State, prev_action: Tensor, is_first: Tensor, distance: int) -> Tensor:
    """Latent overshooting: the mean over d = 2..distance of KL(sg(posterior at t+d) || prior rolled d steps
    open-loop from the posterior at t), with free nats, over the (t, t+d) pairs no episode start separates.

    All start positions roll at once: after k steps, column j of the rollout predicts position j + k."""
    rssm = model.rssm
    rolled = {k: post[k] for k in ("deter", "stoch")}
    valid = torch.ones_like(is_first, dtype=torch.float32)
    terms = []
    for k in range(1, distance + 1):
        t = is_first.shape[1] - k
        if t <= 0:
            break
        start = {key: rolled[key][:, :t].reshape(-1, rolled[key].shape[-1]) for key in ("deter", "stoch")}
        step = rssm.img_step(start, prev_action[:, k:].reshape(-1, prev_action.shape[-1]))
        rolled = {key: step[key].reshape(-1, t, step[key].shape[-1]) for key in ("deter", "stoch", "mean", "std")}
        valid = valid[:, :t] * (1.0 - is_first[:, k:].float())
        if k == 1:
            continue  # the one-step KL is the model's own KL term
        target = {key: post[key][:, k:].detach() for key in ("mean", "std")}
        kl = rssm.kl_loss(target, rolled)
        terms.append((kl * valid).sum() / valid.sum().clamp(min=1.0))
    return torch.stack(terms).mean() if terms else torch.zeros((), device=prev_action.device)
