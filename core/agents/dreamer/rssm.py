"""The recurrent state-space model: a deterministic GRU state plus categorical latents.

State = {"deter": (B, D), "stoch": (B, S, K) one-hot samples, "logp": (B, S, K) unimixed
log-probabilities}. `is_first` resets both the state and the previous action to zero before the
step that uses them (forgetting the action is as important as forgetting the latent).
Gaussian latents (Dreamer v1, PlaNet) are the subclass in `gaussian.py`; `dreamer.latent` picks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.dreamer.dists import categorical_entropy, categorical_kl, onehot_noise, sample_onehot, unimix_logits
from core.agents.dreamer.layers import BlockLinear, Dense, Norm
from core.agents.dreamer.onehot import OneHotCols
from core.config.agent import DreamerConfig

State = dict[str, Tensor]


def free_nats(kl: Tensor, free: float, placement: str) -> Tensor:
    """The KL loss with free nats, no gradient while the KL is below them; `kl` per position (B, T).

    step: each position's KL is floored (DreamerV3, PlaNet). mean: the floor applies once, to the KL
    averaged over all positions (Dreamer v1, DreamerV2's free_avg): below it every position reads
    `free`, a constant, so the mean is max(mean KL, free) and the shape stays (B, T).
    """
    if placement == "step":
        return torch.clamp(kl, min=free)
    below = kl.detach().float().mean() < free
    return torch.where(below, torch.full_like(kl, free), kl)


class RSSM(nn.Module):
    ONEHOT = True  # latent samples are one-hot (a Gaussian-latent subclass, PlaNet's, sets False)

    def __init__(self, cfg: DreamerConfig, act_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, g = cfg.deter, cfg.hidden, cfg.gru_blocks
        self.deter, self.stoch, self.classes, self.blocks = d, cfg.stoch, cfg.classes, g
        self.stoch_dim, params = self.latent_widths()
        self.feat_dim = d + self.stoch_dim  # width of feat() = [deter, flat stoch]
        self.act_dim = act_dim
        # feat() = [deter, flat stoch]: where layers fed by it find the one-hot latent samples
        self.feat_cols = OneHotCols(d, d + self.stoch_dim, cfg.classes) if self.ONEHOT else None
        stoch_cols = OneHotCols(0, self.stoch_dim, cfg.classes) if self.ONEHOT else None
        if cfg.gru_input_layers:  # 2024: each input through its own Linear+Norm+SiLU
            self.in_deter = Dense(d, h, cfg.norm, act=cfg.act)
            self.in_stoch = Dense(self.stoch_dim, h, cfg.norm, stoch_cols, cfg.act)
            self.in_action = Dense(act_dim, h, cfg.norm, act=cfg.act)
            self.core_hidden = BlockLinear(3 * h + d // g, d // g, g)
            self.core_norm = Norm(d, cfg.gru_norm)  # over all of deter, one deter-wide scale (not per block)
            self.gates = BlockLinear(d // g, 3 * d // g, g)
            self.gates_norm = None
            img_layers = 2
        else:  # 2023: one input layer, then a LayerNorm GRU
            self.in_joint = Dense(self.stoch_dim + act_dim, h, cfg.norm, stoch_cols, cfg.act)
            self.gates = BlockLinear(h + d // g, 3 * d // g, g)
            self.gates_norm = Norm(3 * d, cfg.gru_norm)  # v1: none (a plain GRU); 2023, v2: LayerNorm
            img_layers = 1
        self.prior_net = nn.Sequential(*[Dense(d if i == 0 else h, h, cfg.norm, act=cfg.act)
                                         for i in range(img_layers)])
        self.prior_out = nn.Linear(h, params)
        self.post_net = Dense(d + embed_dim, h, cfg.norm, act=cfg.act)
        self.post_out = nn.Linear(h, params)

    def latent_widths(self) -> tuple[int, int]:
        """(flat latent width, width of the distribution parameters prior and posterior output): the
        logits of `stoch` categoricals of `classes`."""
        return self.stoch * self.classes, self.stoch * self.classes

    # --- state helpers
    def initial(self, batch: int, device: torch.device) -> State:
        return {
            "deter": torch.zeros(batch, self.deter, device=device),
            "stoch": torch.zeros(batch, self.stoch, self.classes, device=device),
        }

    @staticmethod
    def feat(state: State) -> Tensor:
        stoch = state["stoch"]
        return torch.cat([state["deter"], stoch.reshape(*stoch.shape[:-2], -1).to(state["deter"].dtype)], -1)

    def _logp(self, logits: Tensor) -> Tensor:
        return unimix_logits(logits.reshape(*logits.shape[:-1], self.stoch, self.classes), self.cfg.unimix)

    # --- one step
    def _gru(self, deter: Tensor, stoch: Tensor, action: Tensor) -> Tensor:
        b, g = deter.shape[0], self.blocks
        stoch = stoch.reshape(b, -1).to(deter.dtype)
        action = action / torch.clamp(action.abs(), min=1.0).detach()  # actions beyond [-1, 1] are squashed
        if self.cfg.gru_input_layers:
            x = torch.cat([self.in_deter(deter), self.in_stoch(stoch), self.in_action(action)], -1)
            x = torch.cat([x[:, None].expand(b, g, x.shape[-1]), deter.reshape(b, g, -1)], -1)
            x = F.silu(self.core_norm(self.core_hidden(x).reshape(b, -1))).reshape(b, g, -1)
            parts = self.gates(x)
        else:
            x = self.in_joint(torch.cat([stoch, action], -1))
            x = torch.cat([x[:, None].expand(b, g, x.shape[-1]), deter.reshape(b, g, -1)], -1)
            parts = self.gates_norm(self.gates(x).reshape(b, -1)).reshape(b, g, -1)
        reset, cand, update = parts.chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)  # bias the update gate towards keeping the state
        new = update * cand + (1.0 - update) * deter.reshape(b, g, -1)
        return new.reshape(b, -1)

    def img_step(self, state: State, action: Tensor, noise: Tensor | None = None) -> State:
        """Prior: the next state predicted from the state and action alone (`noise`: the sample's
        uniforms, `onehot_noise`, drawn beforehand; else drawn here)."""
        deter = self._gru(state["deter"], state["stoch"], action)
        logp = self.prior_logp(deter)
        return {"deter": deter, "stoch": sample_onehot(logp, noise=noise), "logp": logp}

    def prior_logp(self, deter: Tensor) -> Tensor:
        """The prior's log-probabilities given the deterministic state (any leading axes)."""
        return self._logp(self.prior_out(self.prior_net(deter)))

    def prior(self, deter: Tensor) -> State:
        """The prior's distribution (no sample) given the deterministic state (any leading axes)."""
        return {"deter": deter, "logp": self.prior_logp(deter)}

    def sample_noise(self, shape: torch.Size | tuple[int, ...], device: torch.device | None = None) -> Tensor:
        """The random numbers sampling latents of `shape` (a state's "stoch") draws: one uniform per categorical."""
        return onehot_noise(shape, device)

    def observed_deter(self, state: State, prev_action: Tensor, is_first: Tensor) -> Tensor:
        """The GRU step of an observed step; `is_first` resets state and previous action first."""
        keep = (1.0 - is_first.float())[:, None]
        stoch = state["stoch"] * keep.reshape(-1, *[1] * (state["stoch"].ndim - 1))
        return self._gru(state["deter"] * keep, stoch, prev_action * keep)

    def obs_step(self, state: State, prev_action: Tensor, embed: Tensor, is_first: Tensor) -> tuple[State, State]:
        """Posterior and prior (its distribution, for the KL; no sample) of one observed step."""
        post = self._post_step(state, prev_action, self.post_embed_part(embed), is_first)
        return post, self.prior(post["deter"])

    def _post_step(self, state: State, prev_action: Tensor, embed_part: Tensor, is_first: Tensor) -> State:
        """The posterior of one observed step, given its embedding half `post_embed_part(embed)`."""
        deter = self.observed_deter(state, prev_action, is_first)
        return self.post_from_parts(deter, self.post_deter_part(deter), embed_part)

    # --- the posterior's first layer split into its deter and embedding columns. Acting computes
    # the deter half before the observation arrives; observe() computes the embedding half of a
    # whole sequence in one product (the embeddings do not depend on the recurrence).
    def advance(self, state: State, action: Tensor) -> Tensor:
        """The next deter from the state and the action taken, before the next observation exists:
        the same arithmetic as an observed step that does not start an episode."""
        return self._gru(state["deter"], state["stoch"], action)

    def post_deter_part(self, deter: Tensor) -> Tensor:
        """The posterior's first layer applied to `deter` alone (its weights' deter columns), with
        the layer's bias: the embedding half adds none, so the two halves sum to the layer."""
        layer = self.post_net[0]
        return F.linear(deter, layer.weight[:, : self.deter], layer.bias)

    def post_embed_part(self, embed: Tensor) -> Tensor:
        """The posterior's first layer applied to the embedding alone (any leading axes), no bias."""
        return F.linear(embed, self.post_net[0].weight[:, self.deter :])

    def post_from_parts(self, deter: Tensor, deter_part: Tensor, embed_part: Tensor,
                        noise: Tensor | None = None) -> State:
        """The posterior from the two halves of its first layer; equal to the layer applied to
        [deter, embed] up to float rounding (the sum is split in two)."""
        _, norm, act = self.post_net
        logp = self._logp(self.post_out(act(norm(deter_part + embed_part))))
        return {"deter": deter, "stoch": sample_onehot(logp, noise=noise), "logp": logp}

    def post_cell(self, deter: Tensor, stoch: Tensor, prev_action: Tensor, embed_part: Tensor, is_first: Tensor,
                  noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One observed step on plain tensors, its sample's random numbers given: (deter, stoch, dist) of
        the posterior, dist its parameters as one tensor (`dist_params`). What observe() loops over; the
        trainer may pass a torch.compile'd twin of it."""
        deter = self.observed_deter({"deter": deter, "stoch": stoch}, prev_action, is_first)
        post = self.post_from_parts(deter, self.post_deter_part(deter), embed_part, noise)
        return post["deter"], post["stoch"], self.dist_params(post)

    def dist_params(self, state: State) -> Tensor:
        """A state's distribution as one tensor: the log-probabilities."""
        return state["logp"]

    def with_dist(self, state: State, params: Tensor) -> State:
        """`state` with the distribution `dist_params` returned put back under its keys."""
        return {**state, "logp": params}

    # --- sequences
    def observe(self, embed: Tensor, prev_action: Tensor, is_first: Tensor, state: State,
                cell: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None) -> tuple[State, State]:
        """Roll the posterior over (B, T) inputs; returns stacked (B, T, ...) posts and priors.
        `cell`: the step (default `post_cell`); every step's uniforms are drawn at once beforehand,
        the same numbers as drawn step by step.

        Only the GRU and the posterior run step by step (the next step needs the sample). The
        embedding half of the posterior's first layer runs once over the sequence, and the prior
        (nothing in the recurrence reads it) once over all T deters after the loop: large
        products instead of T small ones. unbind() hands the per-step slices to the loop so that
        their gradients are stacked once instead of T zero-padded copies being summed.
        """
        cell = cell or self.post_cell
        embed_parts = self.post_embed_part(embed).unbind(1)
        actions, firsts = prev_action.unbind(1), is_first.unbind(1)
        noise = self.sample_noise((len(embed_parts), *state["stoch"].shape), embed.device).unbind(0)
        deter, stoch, posts = state["deter"], state["stoch"], []
        for t in range(len(embed_parts)):
            deter, stoch, dist = cell(deter, stoch, actions[t], embed_parts[t], firsts[t], noise[t])
            posts.append((deter, stoch, dist))
        deters, stochs, dists = (torch.stack(v, 1) for v in zip(*posts))
        post = self.with_dist({"deter": deters, "stoch": stochs}, dists)
        return post, self.prior(post["deter"])

    def imagine(self, state: State, policy: Callable[[State], Tensor], horizon: int) -> tuple[State, Tensor]:
        """Roll the prior forward under `policy`; returns states s_0..s_H (H+1, N, ...) and the
        actions taken in s_0..s_{H-1} (H, N, A). No action is drawn in s_H: no loss uses one."""
        states, actions = [state], []
        for _ in range(horizon):
            action = policy(state)
            actions.append(action)
            state = self.img_step(state, action)
            states.append(state)
        keys = ("deter", "stoch")
        return {k: torch.stack([s[k] for s in states]) for k in keys}, torch.stack(actions)

    # --- losses
    def kl(self, post: State, prior: State) -> Tensor:
        """KL(posterior || prior) summed over the latents, per leading position."""
        return categorical_kl(post["logp"], prior["logp"]).sum(-1)

    def entropy(self, state: State) -> Tensor:
        """The entropy of a state's latent distribution, averaged over the latents."""
        return categorical_entropy(state["logp"]).mean(-1)

    def kl_losses(self, post: State, prior: State) -> tuple[Tensor, Tensor]:
        """(dyn, rep) losses per (B, T): KL summed over latents, then free nats (`free_nats`; no gradient
        below the floor). dyn = KL(sg(post) || prior) trains the prior, rep = KL(post || sg(prior)) the
        posterior; kl_dyn = kl_rep = 0.5 is the plain KL (v1), 0.8 / 0.2 DreamerV2's balancing."""
        dyn = self.kl(self._detach(post), prior)
        rep = self.kl(post, self._detach(prior))
        cfg = self.cfg
        return free_nats(dyn, cfg.free_nats, cfg.free_nats_placement), free_nats(rep, cfg.free_nats,
                                                                                   cfg.free_nats_placement)

    @staticmethod
    def _detach(state: State) -> State:
        return {k: v.detach() for k, v in state.items()}
