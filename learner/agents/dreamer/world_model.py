"""The world model: encoder, RSSM, decoder, reward and continuation heads, and its loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.dreamer.codec import Decoder, Encoder
from core.agents.dreamer.dists import TwoHot, categorical_kl, make_bins, symlog
from core.agents.dreamer.layers import MLP, init_params_, mlps_on, zero_linear
from core.agents.dreamer.preprocess import ObsKeys
from core.agents.dreamer.rssm import State
from core.agents.dreamer.transformer import make_dynamics
from core.agents.spaces import ActSpace, ObsSpace
from core.config.agent import DreamerConfig


class WorldModel(nn.Module):
    def __init__(self, cfg: DreamerConfig, space: ObsSpace, keys: ObsKeys, act: ActSpace) -> None:
        super().__init__()
        self.cfg, self.keys, self.act = cfg, keys, act
        self.encoder = Encoder(cfg, space, keys)
        self.rssm = make_dynamics(cfg, act.dim, self.encoder.out_dim)  # the RSSM, or the transformer
        cols = self.rssm.feat_cols  # feat = [deter, stoch]: its one-hot columns end it (None: Gaussian latents)
        self.feat_dim = self.rssm.deter + self.rssm.stoch_dim
        self.decoder = Decoder(cfg, space, keys, self.feat_dim, cols)
        self.reward_net = MLP(self.feat_dim, cfg.head_layers, cfg.units, cfg.norm, cols, cfg.act)
        self.reward_out = zero_linear(cfg.units, cfg.num_bins)
        self.cont_net = MLP(self.feat_dim, cfg.head_layers, cfg.units, cfg.norm, cols, cfg.act)
        self.cont_out = nn.Linear(cfg.units, 1)
        self.register_buffer("bins", make_bins(cfg.bins, cfg.num_bins, cfg.bin_limit), persistent=False)
        init_params_(self, cfg.init_fan)

    def reward(self, feat: Tensor) -> TwoHot:
        return self._reward_from(self.reward_net(feat))

    def cont_logit(self, feat: Tensor) -> Tensor:
        return self._cont_from(self.cont_net(feat))

    def heads(self, feat: Tensor) -> tuple[TwoHot, Tensor]:
        """(reward(feat), cont_logit(feat)), their first layers as one product (`mlps_on`)."""
        rew, cont = mlps_on(feat, [self.reward_net, self.cont_net])
        return self._reward_from(rew), self._cont_from(cont)

    def _reward_from(self, hidden: Tensor) -> TwoHot:
        return TwoHot(self.reward_out(hidden), self.bins, self.cfg.bins)

    def _cont_from(self, hidden: Tensor) -> Tensor:
        return self.cont_out(hidden).squeeze(-1).float()

    def loss(self, data: dict[str, Tensor], state: State,
             cell: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
             ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """Per-(B, T) world-model loss, the posterior states, and metrics (`cell`: the observe step,
        `RSSM.observe`'s).

        `data["action"]` holds the action taken at each step; the model at step t is driven by the
        action of step t-1 (for t = 0 it comes from `state["action"]`, the replay context).
        """
        cfg = self.cfg
        embed = self.encoder(data)
        prev_action = torch.cat([state["action"][:, None], data["action"][:, :-1]], 1)
        post, prior = self.rssm.observe(embed, prev_action, data["is_first"], state, cell)
        dyn, rep = self.rssm.kl_losses(post, prior)
        feat = self.rssm.feat(post)
        recon = self.decoder(feat)
        losses: dict[str, Tensor] = {}
        for key in self.keys.images:
            losses[f"image/{key}"] = (recon[key].float() - data[key]).square().sum((-3, -2, -1))
        for key in self.keys.vectors:
            target = symlog(data[key].reshape(*data[key].shape[:2], -1))
            losses[f"vector/{key}"] = (recon[key].float() - target).square().sum(-1)
        dec = sum(losses.values())
        reward, cont_logit = self.heads(feat)
        rew = -reward.log_prob(data["reward"])
        cont = F.binary_cross_entropy_with_logits(cont_logit, 1.0 - data["is_terminal"], reduction="none")
        total = (cfg.dec_scale * dec + cfg.reward_scale * rew + cfg.cont_scale * cont
                 + cfg.kl_dyn * dyn + cfg.kl_rep * rep)
        with torch.no_grad():
            if "logp" in post:  # categorical latents (the transformer's too)
                kl = categorical_kl(post["logp"], prior["logp"]).sum(-1)
                entropy = -(post["logp"].exp() * post["logp"]).sum(-1).mean()
            else:
                kl, entropy = self.rssm.kl(post, prior), self.rssm.entropy(post).mean()
            metrics = {"wm/dec": dec.mean(), "wm/reward": rew.mean(), "wm/cont": cont.mean(),
                       "wm/kl": kl.mean(), "wm/dyn": dyn.mean(), "wm/rep": rep.mean(), "wm/post_entropy": entropy}
            metrics.update({f"wm/{k}": v.mean() for k, v in losses.items()})
        return total, post, metrics
