"""Actor and critic learned in imagination: lambda-returns, return normalisation, slow critic."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from core.agents.dreamer.actor import Actor
from core.agents.dreamer.dists import BoundedNormal, OneHotDist, TwoHot, make_bins
from core.agents.dreamer.layers import MLP, init_params_, zero_linear
from core.agents.dreamer.onehot import OneHotCols
from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig


class Critic(nn.Module):
    def __init__(self, cfg: DreamerConfig, feat_dim: int, onehot: OneHotCols | None = None) -> None:
        super().__init__()
        self.kind = cfg.bins
        self.net = MLP(feat_dim, cfg.ac_layers, cfg.units, cfg.norm, onehot, cfg.act)
        self.out = zero_linear(cfg.units, cfg.num_bins)
        self.register_buffer("bins", make_bins(cfg.bins, cfg.num_bins, cfg.bin_limit), persistent=False)

    def forward(self, feat: Tensor) -> TwoHot:
        return TwoHot(self.out(self.net(feat)), self.bins, self.kind)


class ReturnNorm(nn.Module):
    """Scale = max(limit, EMA(P_high) - EMA(P_low)) of lambda-returns; the floor keeps small sparse
    returns from being divided up into large advantages."""

    def __init__(self, cfg: DreamerConfig) -> None:
        super().__init__()
        self.rate, self.limit, self.debias = cfg.retnorm_rate, cfg.retnorm_limit, cfg.retnorm_debias
        self.q = (cfg.retnorm_low / 100.0, cfg.retnorm_high / 100.0)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: Tensor) -> None:
        flat = returns.detach().float().flatten()
        low, high = torch.quantile(flat, torch.tensor(self.q, device=flat.device))
        self.low.lerp_(low, self.rate)
        self.high.lerp_(high, self.rate)
        self.count += 1

    def scale(self) -> Tensor:
        span = self.high - self.low
        if self.debias:
            span = span / (1.0 - (1.0 - self.rate) ** self.count).clamp(min=1e-8)
        return torch.clamp(span, min=self.limit)


def lambda_return(reward: Tensor, disc: Tensor, value: Tensor, lam: float) -> Tensor:
    """R_t = r_{t+1} + disc_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H.

    reward/disc/value are (H+1, N) over states s_0..s_H (reward[t] arrives on entering s_t);
    returns (H, N) for s_0..s_{H-1}.
    """
    out = [value[-1]]
    for t in reversed(range(value.shape[0] - 1)):
        out.append(reward[t + 1] + disc[t + 1] * ((1.0 - lam) * value[t + 1] + lam * out[-1]))
    return torch.stack(out[::-1][:-1])


class Behavior(nn.Module):
    """Actor, critic, slow critic and return normaliser, with their losses in imagination."""

    def __init__(self, cfg: DreamerConfig, feat_dim: int, act: ActSpace, onehot: OneHotCols | None = None) -> None:
        super().__init__()
        self.cfg, self.act_space = cfg, act
        self.actor = Actor(cfg, feat_dim, act, onehot)
        self.critic = Critic(cfg, feat_dim, onehot)
        init_params_(self, cfg.init_fan)  # before the copy: the slow critic starts equal to the critic
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = ReturnNorm(cfg)

    @torch.no_grad()
    def update_slow(self, updates: int = 0) -> None:
        """Move the slow critic towards the critic, on every `slow_critic_every`-th update (`updates`: the
        updates done before this one; v2 copies it at 0, 100, 200 ...)."""
        if updates % self.cfg.slow_critic_every:
            return
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.lerp_(fast, self.cfg.slow_critic_rate)

    def uses_dynamics_grad(self) -> bool:
        return not self.act_space.discrete and self.cfg.actor_grad_continuous in ("dynamics", "both")

    def loss(
        self, feat: Tensor, action: Tensor, reward: Tensor, cont: Tensor,
        policy: OneHotDist | BoundedNormal | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Losses on an imagined trajectory: `feat`/`reward`/`cont` over s_0..s_H (H+1, N, ...),
        `action` the actions taken in s_0..s_{H-1} (H, N, A).

        `reward`/`cont` are the world model's predictions (cont[0] from the data). `policy` is the
        actor's distribution in s_0..s_{H-1} given sg(feat), with its graph (imagination computes
        it anyway); without it the actor is run here. Returns the total actor+critic loss (scalar),
        the lambda-returns of s_0 (for replay value targets) and metrics.
        """
        cfg = self.cfg
        disc = cfg.gamma * cont
        # Weights: how likely each imagined state is reached, detached (no gradient through it).
        weight = torch.cumprod(disc, 0).detach()
        sg_feat = feat.detach()
        critic = self.critic(sg_feat)  # one pass over s_0..s_H serves values, baseline and loss
        value = critic.mean()
        if self.uses_dynamics_grad():
            # The fast critic's values with its weights as constants: dynamics gradients pass
            # through them (bootstrap and baseline), the actor's loss does not train the critic.
            weights = {k: v.detach() for k, v in self.critic.named_parameters()}
            fast = torch.func.functional_call(self.critic, weights, (feat,)).mean()
        else:
            fast = value.detach()
        if cfg.critic_bootstrap == "fast":
            boot = fast
        else:  # the slow critic has no trainable parameters, so dynamics gradients may pass through it
            boot = self.slow_critic(feat if self.uses_dynamics_grad() else sg_feat).mean()
        ret = lambda_return(reward, disc, boot, cfg.lam)
        self.retnorm.update(ret)
        scale = self.retnorm.scale() if cfg.return_norm else torch.ones((), device=ret.device)
        if policy is None:
            policy = self.actor(sg_feat[:-1])
        # The baseline v(s_t) on the imagined trajectory, from the critic that bootstraps (v2: the slow
        # one); v1 maximises the returns themselves.
        adv = (ret - boot[:-1]) / scale if cfg.actor_baseline else ret / scale
        # Dynamics backprop: the gradient flows back through the imagined trajectory; REINFORCE: the
        # advantage is a constant weight on the log-probability; both: DreamerV2's mix of the two.
        reinforce = -policy.log_prob(action.detach()) * adv.detach()
        if not self.uses_dynamics_grad():
            actor_loss = reinforce
        elif cfg.actor_grad_continuous == "both":
            actor_loss = cfg.actor_grad_mix * -adv + (1.0 - cfg.actor_grad_mix) * reinforce
        else:
            actor_loss = -adv
        entropy = policy.entropy()
        actor_loss = (weight[:-1] * (actor_loss - cfg.entropy * entropy)).mean()
        dist = TwoHot(critic.logits[:-1], critic.bins, critic.kind)
        # The slow critic's values of s_0..s_H-1 are the bootstrap values already when it bootstraps.
        slow = boot[:-1] if cfg.critic_bootstrap == "slow" else self.slow_critic(sg_feat[:-1]).mean()
        slow_target = slow.detach()
        critic_loss = -dist.log_prob(ret.detach()) - cfg.slow_critic_reg * dist.log_prob(slow_target)
        critic_loss = (weight[:-1] * critic_loss).mean()
        total = cfg.actor_scale * actor_loss + cfg.critic_scale * critic_loss
        metrics = {
            "ac/actor_loss": actor_loss.detach(), "ac/critic_loss": critic_loss.detach(),
            "ac/entropy": entropy.detach().mean(), "ac/return": ret.detach().mean(),
            "ac/value": value.detach().mean(), "ac/return_scale": scale.detach(),
            "ac/imag_reward": reward[1:].detach().mean(),
            "ac/adv": adv.detach().mean(), "ac/adv_std": adv.detach().std(), "ac/adv_mag": adv.detach().abs().mean(),
        }
        return total, ret[0].detach(), metrics

    def replay_value_loss(
        self, feat: Tensor, reward: Tensor, is_terminal: Tensor, is_first: Tensor, is_last: Tensor, boot: Tensor
    ) -> Tensor:
        """Critic loss on replayed sequences (B, T); gradients reach the world model through `feat`.

        Targets are lambda-returns of the real rewards, bootstrapped by each state's imagined
        return `boot`; a sequence is cut where the next step starts a new episode. The last step of
        an episode has no target of its own (no real step follows it in its episode; at a terminal
        one the imagined return is meaningless), so its loss is masked out, as officially.
        """
        cfg = self.cfg
        disc = cfg.gamma * (1.0 - is_terminal)
        rets = [boot[:, -1]]
        for t in reversed(range(feat.shape[1] - 1)):
            nxt = reward[:, t + 1] + disc[:, t + 1] * ((1.0 - cfg.lam) * boot[:, t + 1] + cfg.lam * rets[-1])
            rets.append(torch.where(is_first[:, t + 1] > 0, boot[:, t], nxt))
        target = torch.stack(rets[::-1], 1)[:, :-1].detach()
        dist = self.critic(feat[:, :-1])
        slow_target = self.slow_critic(feat[:, :-1].detach()).mean().detach()
        loss = -dist.log_prob(target) - cfg.slow_critic_reg * dist.log_prob(slow_target)
        return (loss * (1.0 - is_last[:, :-1])).mean()
