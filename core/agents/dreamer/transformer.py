"""The transformer sequence model of Dreamer's world model (`dreamer.dynamics: transformer`, STORM-like).

The GRU's deterministic path is replaced by a small causal transformer over one token per step: the token at
step t embeds the previous step's latent sample and the action taken there, (z_{t-1}, a_{t-1}), zeroed where
step t starts an episode (the RSSM's reset); the block output at t, projected to `dreamer.deter` units, is the
step's deter. Everything downstream of deter (the prior, the heads, the decoder, the actor-critic) is
Dreamer's own. The posterior reads the observation's embedding alone, so a whole replayed sequence is sampled
first and the transformer then runs once over it (the RSSM steps T times).

Attention: a step sees the steps of its own episode within the last `context` (itself included), with an
ALiBi bias (-slope_h x distance per head) and no absolute positions, so a sliding KV cache (a robot acting
for hours, imagination continuing a replayed window) computes exactly what the full masked forward does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.attention import Block
from core.agents.dreamer.dists import sample_onehot
from core.agents.dreamer.layers import Dense
from core.agents.dreamer.onehot import OneHotCols
from core.agents.dreamer.rssm import RSSM, State
from core.config.agent import DreamerConfig

Memory = dict[str, Tensor]  # a KV cache: "kv" (N, layers, 2, heads, L, d), "pos" (N, L), "valid" (N, L), "next" (N,)


def alibi_slopes(heads: int) -> Tensor:
    """The geometric per-head slopes of ALiBi (Press et al. 2022): 2^(-8 i / heads), i = 1 .. heads."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


class TransformerDynamics(nn.Module):
    """Drop-in for `RSSM` in the world model and the policy: same state keys, prior, KL and features."""

    ONEHOT = True

    def __init__(self, cfg: DreamerConfig, act_dim: int, embed_dim: int) -> None:
        super().__init__()
        tc = cfg.transformer
        self.cfg, self.tcfg = cfg, tc
        self.deter, self.stoch, self.classes = cfg.deter, cfg.stoch, cfg.classes
        self.stoch_dim, params = self.latent_widths()
        self.act_dim, self.heads, self.layers = act_dim, tc.heads, tc.layers
        self.feat_cols = OneHotCols(self.deter, self.deter + self.stoch_dim, cfg.classes)
        self.token_in = nn.Linear(self.stoch_dim + act_dim, tc.width)
        self.token_norm = nn.LayerNorm(tc.width)
        self.blocks = nn.ModuleList(Block(tc.width, tc.heads, tc.mlp_ratio) for _ in range(tc.layers))
        self.out_norm = nn.LayerNorm(tc.width)
        self.out = nn.Linear(tc.width, self.deter)
        h = cfg.hidden
        self.prior_net = nn.Sequential(Dense(self.deter, h, cfg.norm), Dense(h, h, cfg.norm))
        self.prior_out = nn.Linear(h, params)
        self.post_net = Dense(embed_dim, h, cfg.norm)
        self.post_out = nn.Linear(h, params)
        self.register_buffer("slopes", alibi_slopes(tc.heads), persistent=False)

    # The RSSM's definitions wherever they do not involve the GRU: one concept in one place.
    latent_widths = RSSM.latent_widths
    feat = staticmethod(RSSM.feat)
    _logp = RSSM._logp
    prior_logp = RSSM.prior_logp
    kl_losses = RSSM.kl_losses
    kl = RSSM.kl  # what kl_losses reads (free nats placed as dreamer.free_nats_placement says)
    _detach = staticmethod(RSSM._detach)

    # --- state
    def initial(self, batch: int, device: torch.device) -> State:
        """The zero state and an empty KV cache (acting keeps the cache in the state)."""
        return {"deter": torch.zeros(batch, self.deter, device=device),
                "stoch": torch.zeros(batch, self.stoch, self.classes, device=device),
                **self.empty_memory(batch, device)}

    def empty_memory(self, batch: int, device: torch.device) -> Memory:
        d = self.tcfg.width // self.heads
        return {"kv": torch.zeros(batch, self.layers, 2, self.heads, 0, d, device=device),
                "pos": torch.zeros(batch, 0, dtype=torch.long, device=device),
                "valid": torch.zeros(batch, 0, dtype=torch.bool, device=device),
                "next": torch.zeros(batch, dtype=torch.long, device=device)}

    # --- tokens and the full forward
    def token(self, stoch: Tensor, action: Tensor) -> Tensor:
        """The token of a step's (latent sample, action taken), any leading axes."""
        stoch = stoch.reshape(*stoch.shape[:-2], -1)
        action = action / torch.clamp(action.abs(), min=1.0).detach()  # actions beyond [-1, 1] are squashed
        return self.token_norm(self.token_in(torch.cat([stoch.to(action.dtype), action], -1)))

    def attention_bias(self, is_first: Tensor) -> Tensor:
        """(B, heads, T, T) additive mask: step i sees step j <= i of its own episode (no episode start in
        (j, i]) within the context, biased by -slope x (i - j); -inf elsewhere."""
        t = is_first.shape[1]
        episode = torch.cumsum(is_first.long(), 1)
        idx = torch.arange(t, device=is_first.device)
        dist = idx[:, None] - idx[None, :]
        allowed = (dist >= 0) & (dist < self.tcfg.context) & (episode[:, :, None] == episode[:, None, :])
        bias = -self.slopes[None, :, None, None] * dist.float()[None, None]
        return bias.masked_fill(~allowed[:, None], float("-inf"))

    def forward_tokens(self, tokens: Tensor, is_first: Tensor) -> tuple[Tensor, Tensor]:
        """deter (B, T, deter) of every step at once, and the keys and values (B, layers, 2, heads, T, d)."""
        x, bias, kvs = tokens, self.attention_bias(is_first), []
        for block in self.blocks:
            x, (k, v) = block(x, mask=bias)
            kvs.append(torch.stack([k, v], 1))
        return self.out(self.out_norm(x)), torch.stack(kvs, 1)

    def post_logp(self, embed: Tensor) -> Tensor:
        """The posterior's log-probabilities from the observation's embedding alone (any leading axes)."""
        return self._logp(self.post_out(self.post_net(embed)))

    def observe(self, embed: Tensor, prev_action: Tensor, is_first: Tensor, state: State,
                cell: Any = None) -> tuple[State, State]:
        """Posteriors and priors of (B, T) inputs, as `RSSM.observe` (`cell` is the RSSM's compiled step:
        unused). The first token is (state["stoch"], prev_action[:, 0]): the replay context's latent.
        post also holds "kv" (B, layers, 2, heads, T, d) and "episode" (B, T) for imagination's caches."""
        logp = self.post_logp(embed)
        stoch = sample_onehot(logp)
        prev_stoch = torch.cat([state["stoch"][:, None].to(stoch.dtype), stoch[:, :-1]], 1)
        keep = 1.0 - is_first.float()
        tokens = self.token(prev_stoch * keep[..., None, None], prev_action * keep[..., None])
        deter, kv = self.forward_tokens(tokens, is_first)
        post = {"deter": deter, "stoch": stoch, "logp": logp, "kv": kv,
                "episode": torch.cumsum(is_first.long(), 1)}
        return post, {"deter": deter, "logp": self.prior_logp(deter)}

    # --- the KV cache: one step at a time
    def step(self, token: Tensor, memory: Memory, keep: int | None = None) -> tuple[Tensor, Memory]:
        """deter (N, deter) of one new token (N, width) after the cached ones, and the cache with it (its last
        `keep` entries when given: acting keeps context - 1, so the next step sees `context` with itself)."""
        pos = memory["next"]
        key_pos = torch.cat([memory["pos"], pos[:, None]], 1)
        valid = torch.cat([memory["valid"], torch.ones_like(pos[:, None], dtype=torch.bool)], 1)
        dist = (pos[:, None] - key_pos).float()
        bias = (-self.slopes[None, :, None, None] * dist[:, None, None, :]).masked_fill(
            ~valid[:, None, None, :], float("-inf"))
        x, kvs = token[:, None], []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, (memory["kv"][:, i, 0], memory["kv"][:, i, 1]), mask=bias)
            kvs.append(torch.stack([k, v], 1))
        kv = torch.stack(kvs, 1)
        if keep is not None:
            kv, key_pos, valid = kv[..., -keep:, :], key_pos[:, -keep:], valid[:, -keep:]
        return self.out(self.out_norm(x[:, 0])), {"kv": kv, "pos": key_pos, "valid": valid, "next": pos + 1}

    def act_step(self, state: State, action: Tensor, is_first: Tensor | None = None) -> tuple[Tensor, Memory]:
        """Acting: the next deter from the state (with its cache) and the action just taken; rows where
        `is_first` start an episode: their cache is forgotten and their token is the zero token."""
        memory = {k: state[k] for k in ("kv", "pos", "valid", "next")}
        stoch = state["stoch"]
        if is_first is not None:
            keep = 1.0 - is_first.float()
            stoch, action = stoch * keep[:, None, None], action * keep[:, None]
            memory["valid"] = memory["valid"] & ~is_first.bool()[:, None]
        deter, memory = self.step(self.token(stoch, action), memory, self.tcfg.context - 1)
        live = memory["valid"].any(0)
        if not bool(live[0]):
            # Drop the entries no row may attend to (those before an episode start): masked they weigh exactly
            # zero, yet a longer key axis rounds differently, and a resumed run must act as the uninterrupted one.
            cut = int(torch.argmax(live.to(torch.uint8)))
            memory = {**memory, "kv": memory["kv"][..., cut:, :], "pos": memory["pos"][:, cut:],
                      "valid": memory["valid"][:, cut:]}
        return deter, memory

    def starts(self, post: State) -> tuple[State, Memory]:
        """Imagination starts from every (B, T) posterior step, flat (B*T), each with the keys and values of
        its last `imag_context` real steps (those of its own episode) as its cache."""
        kv, episode = post["kv"].detach(), post["episode"]
        b, t, w = episode.shape[0], episode.shape[1], self.tcfg.imag_context
        windows = F.pad(kv, (0, 0, w - 1, 0)).unfold(4, w, 1)  # (B, layers, 2, heads, T, d, w)
        windows = windows.permute(0, 4, 1, 2, 3, 6, 5).reshape(b * t, *kv.shape[1:4], w, kv.shape[-1])
        idx = torch.arange(t, device=kv.device)
        key_pos = idx[:, None] + torch.arange(-w + 1, 1, device=kv.device)[None]  # (T, w)
        ep = F.pad(episode, (w - 1, 0), value=-1).unfold(1, w, 1)  # (B, T, w): the window's episodes
        valid = (key_pos[None] >= 0) & (ep == episode[..., None])
        flat = {k: post[k].detach().reshape(b * t, *post[k].shape[2:]) for k in ("deter", "stoch")}
        memory = {"kv": windows, "pos": key_pos[None].expand(b, t, w).reshape(b * t, w),
                  "valid": valid.reshape(b * t, w), "next": (idx + 1)[None].expand(b, t).reshape(b * t)}
        return flat, memory

    def img_step(self, state: State, action: Tensor, memory: Memory, noise: Tensor | None = None
                 ) -> tuple[State, Memory]:
        """The prior's next state from the state, the action and the cache (which grows by one)."""
        deter, memory = self.step(self.token(state["stoch"], action), memory)
        logp = self.prior_logp(deter)
        return {"deter": deter, "stoch": sample_onehot(logp, noise=noise), "logp": logp}, memory

    # --- the policy's split posterior (the RSSM's interface): the posterior has no deter half
    def post_deter_part(self, deter: Tensor) -> Tensor:
        return deter.new_zeros(())

    def post_embed_part(self, embed: Tensor) -> Tensor:
        return self.post_net[0](embed)

    def post_from_parts(self, deter: Tensor, deter_part: Tensor, embed_part: Tensor,
                        noise: Tensor | None = None) -> State:
        _, norm, act = self.post_net
        logp = self._logp(self.post_out(act(norm(embed_part + deter_part))))
        return {"deter": deter, "stoch": sample_onehot(logp, noise=noise), "logp": logp}


def make_dynamics(cfg: DreamerConfig, act_dim: int, embed_dim: int) -> RSSM | TransformerDynamics:
    """The world model's sequence model that `dreamer.dynamics` names."""
    if cfg.latent == "gaussian":  # Dreamer v1's latents (the config refuses them with the transformer)
        from core.agents.dreamer.gaussian import GaussianRSSM

        return GaussianRSSM(cfg, act_dim, embed_dim)
    return (TransformerDynamics if cfg.dynamics == "transformer" else RSSM)(cfg, act_dim, embed_dim)
