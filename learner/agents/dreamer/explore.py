"""Plan2Explore and CASCADE on Dreamer's world model: an ensemble's disagreement drives explorers.

An ensemble of one-step predictors learns, from replayed posterior states, to predict the next step's
latent (or recurrent state, or embedding) from the state and the action taken. Where its members
disagree the world model has not seen enough: the disagreement (standard deviation across members,
averaged over dimensions), normalised, is the intrinsic reward of an explorer actor-critic trained in
imagination beside the task actor-critic. Explorer and task have strictly separate actors, critics, slow
critics and return normalisers; the explorer is the policy that acts while collecting.

CASCADE (`dreamer.explore: cascade`) keeps a population of explorers; explorer k is rewarded by
(1 - alpha) disagreement + alpha diversity, the diversity of its imagined final states against those of
explorers 0..k-1 (learner/agents/dreamer/cascade.py). Deployments, each acting with frozen explorers,
are run by learner/explore_deploy.py and bench/exploration.py.

The Dreamer agent holds an `Exploration` when `dreamer.explore` is not none: its modules are part of the
agent's model (checkpointed, checked for NaN, moved to the device with it), its optimisers step with the
task's, and its update wraps the task's (`Exploration.update`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from core.agents.dreamer.policy import Policy, policy_weights
from core.agents.dreamer.rssm import State
from core.config.explore import ExploreConfig
from learner.agents.dreamer.behavior import Behavior
from learner.agents.dreamer.cascade import diversity
from learner.agents.dreamer.cells import Cells
from learner.agents.dreamer.optim import LaProp, PartsAdam

if TYPE_CHECKING:
    from learner.agents.dreamer.agent import Dreamer

ENSEMBLE_CLIP = 100.0  # global gradient-norm clip of the ensemble's Adam (Plan2Explore's)


class Ensemble(nn.Module):
    """K independent MLPs (ELU, as Plan2Explore's), run as batched matrix products: (N, in) -> (K, N, out).

    Each member has its own initialisation: their predictions agree only where the data made them."""

    def __init__(self, members: int, inp: int, out: int, layers: int, units: int) -> None:
        super().__init__()
        dims = [inp, *[units] * layers, out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(members, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, b).uniform_(-bound, bound)))
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        """Every member's prediction for inputs (N, in) (any leading axes): (K, N, out)."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        w0, b0 = self.weights[0], self.biases[0]
        k, inp, units = w0.shape
        # Every member sees the same input: the first layer is one (N, in) x (in, K*units) product, not K
        # products over an expanded copy (the widest layer; ~15 % off the forward on CPU). Column block k is member k.
        first = w0.to(flat.dtype).permute(1, 0, 2).reshape(inp, k * units)
        h = torch.addmm(b0.to(flat.dtype).reshape(1, k * units), flat, first)
        h = h.reshape(-1, k, units).transpose(0, 1)  # (K, N, units)
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.baddbmm(b.to(h.dtype), nn.functional.elu(h), w.to(h.dtype))
        return h.reshape(self.members, *lead, h.shape[-1])

    def loss(self, x: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error of every member (a unit-variance Gaussian's log-likelihood up to constants),
        averaged over the rows `mask` keeps. x (N, in), target (N, out), mask (N,)."""
        err = (self(x).float() - target.float()).square().mean(-1)  # (K, N)
        keep = mask.float()
        return (err * keep).sum(-1).div(keep.sum().clamp(min=1.0)).sum()

    def disagreement(self, x: Tensor) -> Tensor:
        """Standard deviation of the members' predictions (population std), averaged over output dimensions:
        (...,). Written out: `Tensor.std` over the leading member axis is a strided reduction, ~3x slower on
        CPU, and at Plan2Explore's sizes it was a fifth of an update."""
        pred = self(x).float()
        return (pred - pred.mean(0)).square().mean(0).sqrt().mean(-1)


class RewardNorm(nn.Module):
    """Running normalisation of an intrinsic reward, so that its weight means the same on any task:
    mag = r / EMA(mean |r|); std = (r - EMA(mean r)) / EMA(std r); none. The statistics follow the
    values normalised in training (no gradient); the first batch sets them."""

    def __init__(self, kind: str, rate: float, eps: float = 1e-8) -> None:
        super().__init__()
        self.kind, self.rate, self.eps = kind, rate, eps
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("mag", torch.ones(()))
        self.register_buffer("std", torch.ones(()))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, values: Tensor) -> None:
        flat = values.detach().float().flatten()
        rate = torch.where(self.count == 0, 1.0, self.rate)  # no host sync
        self.mean.lerp_(flat.mean(), rate)
        self.mag.lerp_(flat.abs().mean(), rate)
        self.std.lerp_(flat.std(correction=0), rate)
        self.count += 1

    def forward(self, values: Tensor, update: bool = True) -> Tensor:
        if update and torch.is_grad_enabled():
            self.update(values)
        if self.kind == "mag":
            return values / (self.mag + self.eps)
        if self.kind == "std":
            return (values - self.mean) / (self.std + self.eps)
        return values


class ExplorerNet(nn.Module):
    """Every trainable weight exploration adds to the agent: the ensemble, one actor-critic per explorer
    (`Behavior`, the task's class, separate instances) and the reward normalisers."""

    def __init__(self, dreamer: Dreamer, xcfg: ExploreConfig, population: int) -> None:
        super().__init__()
        cfg, wm, act = dreamer.cfg, dreamer.wm, dreamer.model.act_space
        feat = wm.feat_dim
        out = {"stoch": feat - cfg.deter, "deter": cfg.deter, "embed": wm.encoder.out_dim}[xcfg.target]
        inp = feat + (act.dim if xcfg.action_cond else 0)
        self.ensemble = Ensemble(xcfg.ensemble, inp, out, xcfg.ensemble_layers, xcfg.ensemble_units or cfg.units)
        self.behaviors = nn.ModuleList(Behavior(cfg, feat, act, wm.rssm.feat_cols) for _ in range(population))
        self.disag_norm = RewardNorm(xcfg.intrinsic_norm, xcfg.norm_rate)
        self.div_norms = nn.ModuleList(RewardNorm(xcfg.intrinsic_norm, xcfg.norm_rate) for _ in range(population))


class JointOptimizer:
    """The task's optimiser and exploration's, stepped as one: `Dreamer.train` zeroes, steps and
    checkpoints it as it does the task's alone. After a step the explorers' slow critics follow, on the
    task's schedule (`slow_critic_every`)."""

    def __init__(self, parts: Mapping[str, Any], after_step: Any) -> None:
        self.parts, self.after_step = dict(parts), after_step

    def step(self) -> dict[str, Tensor]:
        norms: dict[str, Tensor] = {}
        for name, opt in self.parts.items():
            found = opt.step()
            if isinstance(found, dict):
                norms.update({k if name == "task" else f"{name}/{k}": v for k, v in found.items()})
        self.after_step()
        return norms

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's optimiser state lacks {missing}: it was not written by an agent with "
                             f"dreamer.explore on (resume it with the exploration it was trained with)")
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


class ClippedAdam:
    """Adam after a global gradient-norm clip; step() returns the norm."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, clip: float) -> None:
        self.params, self.clip = list(params), clip
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def step(self) -> dict[str, Tensor]:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return {"ensemble": norm}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class Exploration:
    """What `dreamer.explore` adds to a Dreamer agent: built by it, holding its modules in its model."""

    def __init__(self, dreamer: Dreamer, xcfg: ExploreConfig) -> None:
        from learner.agents.dreamer.agent import frozen  # the agent imports this module

        self._frozen = frozen
        cfg = dreamer.cfg
        self.dreamer, self.xcfg, self.mode = dreamer, xcfg, cfg.explore
        self.population = xcfg.population if cfg.explore == "cascade" else 1
        self.alpha = xcfg.alpha if cfg.explore == "cascade" else 0.0
        self.net = ExplorerNet(dreamer, xcfg, self.population).to(dreamer.device)
        dreamer.model.explore = self.net  # checkpointed, NaN-checked and moved with the agent's model
        compiled = dreamer.cells.post != dreamer.wm.rssm.post_cell  # the task's cells are compiled
        dynamics = self.net.behaviors[0].uses_dynamics_grad()
        self.cells = [Cells(dreamer.wm.rssm, beh.actor, dynamics, compiled) for beh in self.net.behaviors]
        actors = [p for beh in self.net.behaviors for p in beh.actor.parameters()]
        critics = [p for beh in self.net.behaviors for p in beh.critic.parameters()]
        if cfg.optimizer == "laprop":
            ac: Any = LaProp(actors + critics, cfg.lr, cfg.agc, cfg.agc_pmin, cfg.beta1, cfg.beta2, cfg.eps,
                             cfg.warmup)
        else:
            ac = PartsAdam({"actor": (actors, cfg.ac_lr, cfg.ac_eps, cfg.ac_clip),
                            "critic": (critics, cfg.ac_lr, cfg.ac_eps, cfg.ac_clip)})
        ensemble = ClippedAdam(list(self.net.ensemble.parameters()), xcfg.ensemble_lr, ENSEMBLE_CLIP)
        dreamer.optimizer = JointOptimizer({"task": dreamer.optimizer, "explore_ac": ac, "explore_ensemble": ensemble},
                                           self._after_step)
        self.member = 0  # the explorer `policy()` and `policy_weights()` give

    @property
    def trains_task(self) -> bool:
        """Whether the task actor-critic learns while exploring (only when rewards are collected too)."""
        return not self.xcfg.reward_free

    def _after_step(self) -> None:
        # The task's schedule: `Dreamer.train` steps the optimiser, then counts the update, so
        # `dreamer.updates` here is the updates before this one, as the task's `update_slow` gets it.
        for beh in self.net.behaviors:
            beh.update_slow(self.dreamer.updates)

    # --- the update
    def update(self, data: dict[str, Tensor], start: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        """The agent's update with exploration: the world model (on zero rewards when reward-free), the task
        actor-critic when it trains, then the ensemble and the explorers (`loss`), summed into one loss."""
        d = self.dreamer
        if self.xcfg.reward_free:
            data = {**data, "reward": torch.zeros_like(data["reward"])}
        if self.trains_task:
            loss, post, metrics = d._update(data, start)
        else:
            wm_loss, post, metrics = d.wm.loss(data, start, d.cells.post)
            loss = wm_loss.mean()
        x_loss, x_metrics = self.loss(data, post)
        metrics.update(x_metrics)
        loss = loss + x_loss
        metrics["loss"] = loss.detach()
        return loss, post, metrics

    def inputs(self, feat: Tensor, action: Tensor) -> Tensor:
        """The ensemble's input: the state's features, and the action taken there when `action_cond`."""
        return torch.cat([feat, action.to(feat.dtype)], -1) if self.xcfg.action_cond else feat

    def targets(self, post: State, data: Mapping[str, Tensor]) -> Tensor:
        """What the ensemble predicts of each replayed step (B, T, out), without gradient."""
        wm = self.dreamer.wm
        with torch.no_grad():
            if self.xcfg.target == "deter":
                return post["deter"].float()
            if self.xcfg.target == "embed":
                return wm.encoder(data).float()
            return wm.rssm.feat(post)[..., self.dreamer.cfg.deter:].float()

    def ensemble_loss(self, data: Mapping[str, Tensor], post: State) -> Tensor:
        """Each member predicts step t+1 from step t and the action taken at t, over replayed sequences; a
        pair across an episode boundary (step t+1 starts a new episode) is left out."""
        feat = self.dreamer.wm.rssm.feat(post).detach()
        x = self.inputs(feat[:, :-1], data["action"][:, :-1])
        target = self.targets(post, data)[:, 1:]
        mask = 1.0 - data["is_first"][:, 1:].float()
        return self.net.ensemble.loss(x.flatten(0, 1), target.flatten(0, 1), mask.flatten())

    def loss(self, data: Mapping[str, Tensor], post: State) -> tuple[Tensor, dict[str, Tensor]]:
        """The ensemble's loss on the replayed sequences, then each explorer's actor-critic loss in imagination
        from every posterior state. Gradients reach only the ensemble and the explorers' actors and critics:
        the world model is constant here, the ensemble too while it rewards."""
        b, t = data["action"].shape[:2]
        ens_loss = self.ensemble_loss(data, post)
        start = {k: post[k].detach().reshape(b * t, *post[k].shape[2:]) for k in ("deter", "stoch")}
        cont0 = (1.0 - data["is_terminal"].float()).reshape(1, -1)
        total = ens_loss
        sums: dict[str, list[Tensor]] = {}
        for k, r in enumerate(self.rollouts(start, cont0)):
            beh = self.net.behaviors[k]
            ac_loss, _, m = beh.loss(r["feat"].float(), r["actions"], r["reward"], r["cont"],
                                     policy=beh.actor.dist(r["outs"].float()))
            total = total + ac_loss
            m = {**m, "disagreement": r["disagreement"].detach().mean()}
            if r["diversity"] is not None:
                m["diversity"] = r["diversity"].detach().mean()
            for key, value in m.items():
                sums.setdefault(key.removeprefix("ac/"), []).append(value)
        metrics = {f"explore/{k}": torch.stack(v).mean() for k, v in sums.items()}
        metrics["explore/ensemble_loss"] = ens_loss.detach()
        return total, metrics

    def rollouts(self, start: State, cont0: Tensor) -> list[dict[str, Any]]:
        """Each explorer's imagined trajectories from `start`, in population order, with its rewards: explorer
        k's diversity bonus (CASCADE, alpha > 0) on its final state is measured against the final states of
        explorers 0..k-1 of this same call."""
        finals: list[Tensor] = []
        out = []
        for k in range(self.population):
            r = self.imagine(k, start, cont0)
            r["diversity"] = None
            if self.alpha > 0 and finals:
                r["diversity"] = div = diversity(r["final"], finals)
                bonus = self.xcfg.intrinsic * self.alpha * self.net.div_norms[k](div)
                r["reward"] = torch.cat([r["reward"][:-1], r["reward"][-1:] + bonus[None]], 0)
            finals.append(r["final"].detach())
            out.append(r)
        return out

    def imagine(self, k: int, start: State, cont0: Tensor) -> dict[str, Any]:
        """Explorer k's imagined trajectories from `start` and their rewards: feat (H+1, N, F), actions and actor
        outputs (H, N, ...), reward (H+1, N) with reward[0] = 0, cont (H+1, N), the raw disagreement (H, N) and
        the final states' features (N, D) that diversity is measured on."""
        d, cfg, xcfg = self.dreamer, self.dreamer.cfg, self.xcfg
        wm, ensemble = d.wm, self.net.ensemble
        with self._frozen(wm), self._frozen(ensemble):
            states, actions, outs = self.cells[k].imagine(start, cfg.imag_horizon)
            feat = wm.rssm.feat(states)
            reward_head, cont_logit = wm.heads(feat)
            disag = ensemble.disagreement(self.inputs(feat[:-1], actions))  # entering s_1..s_H
        if not self.net.behaviors[k].uses_dynamics_grad():
            disag = disag.detach()
        reward = xcfg.intrinsic * (1.0 - self.alpha) * self.net.disag_norm(disag)
        if xcfg.extrinsic > 0:
            reward = reward + xcfg.extrinsic * reward_head.mean()[1:]
        reward = torch.cat([torch.zeros_like(reward[:1]), reward], 0)
        imag_cont = torch.sigmoid(cont_logit[1:]) if cfg.imag_cont == "prob" else (cont_logit[1:] > 0).float()
        return {"feat": feat, "actions": actions, "outs": outs, "reward": reward,
                "cont": torch.cat([cont0, imag_cont], 0), "disagreement": disag,
                "final": self.diversity_features(states)[-1]}

    def diversity_features(self, states: State) -> Tensor:
        """What of an imagined state its diversity is measured on (`explore.diversity_feat`)."""
        feat = self.dreamer.wm.rssm.feat(states).float()
        which = self.xcfg.diversity_feat
        deter = self.dreamer.cfg.deter
        return feat if which == "feat" else feat[..., :deter] if which == "deter" else feat[..., deter:]

    # --- acting
    def member_policy(self, k: int) -> Policy:
        """Explorer k acting with the live weights (the task policy is `Policy.from_model(agent.model)`)."""
        model = self.dreamer.model
        view = nn.Module()
        view.encoder, view.rssm, view.actor = model.wm.encoder, model.wm.rssm, self.net.behaviors[k].actor
        return Policy(model.cfg, model.space, model.act_space, view, self.dreamer.device)

    def policy(self) -> Policy | RoundRobin:
        """What acts while collecting: the explorer, or the population taking turns by episode."""
        if self.population == 1:
            return self.member_policy(0)
        return RoundRobin([self.member_policy(k) for k in range(self.population)])

    def member_weights(self, k: int, version: int) -> tuple[dict[str, Tensor], dict]:
        """Explorer k's policy blob (tensors, metadata): a Dreamer policy like the task's, any robot acts with it."""
        model = self.dreamer.model
        view = nn.Module()
        view.wm, view.behavior = model.wm, self.net.behaviors[k]
        view.cfg, view.space, view.act_space = model.cfg, model.space, model.act_space
        return policy_weights(view, version)

    def policy_weights(self) -> tuple[dict[str, Tensor], dict]:
        return self.member_weights(self.member, self.dreamer.updates)


class RoundRobin:
    """A population acting one member per episode, in turn (single-process `train` with CASCADE): a new
    episode (`is_first`) hands the next member the control. Each member keeps its own recurrent state."""

    def __init__(self, members: Sequence[Policy]) -> None:
        self.members = list(members)
        self.index = -1
        self.current = self.members[0]

    def __getattr__(self, name: str) -> Any:  # space, act_space, version, inputs, last_action ...
        return getattr(self.current, name)

    def reset(self, batch: int = 1) -> None:
        for policy in self.members:
            policy.reset(batch)

    def prepare(self) -> None:
        self.current.prepare()

    def act(self, obs: Mapping[str, Any], mode: str = "sample", noise: float = 0.0, batched: bool = False) -> Any:
        first = np.asarray(obs["is_first"])
        if bool(first.any() if batched else first):
            self.index = (self.index + 1) % len(self.members)
            self.current = self.members[self.index]
        return self.current.act(obs, mode=mode, noise=noise, batched=batched)

    def context(self) -> dict[str, np.ndarray]:
        return self.current.context()

    def take_state(self, previous: object) -> None:
        self.current.take_state(previous)
