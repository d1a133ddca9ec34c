"""Imagination (and open-loop prediction) with the transformer world model (`dreamer.dynamics: transformer`).

The RSSM's imagination (`cells.Cells`) needs only each start's (deter, stoch); a transformer start also needs the
keys and values of the real steps before it: `TransformerDynamics.starts` cuts every start's window out of the
sequence's keys and values, and each imagined step appends its own. Random numbers are drawn in the same order
as `Cells` draws them (the action's, then the prior sample's). Nothing here is compiled (the config refuses
`dreamer.compile: cell|full` with the transformer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from core.agents.dreamer.actor import Actor
from core.agents.dreamer.dists import onehot_noise, sample_onehot
from core.agents.dreamer.rssm import State
from core.agents.dreamer.transformer import Memory, TransformerDynamics

if TYPE_CHECKING:
    from learner.agents.dreamer.agent import Dreamer


class TransformerCells:
    """`Cells`' interface for the transformer: `post` (unused by its observe) and `imagine`."""

    def __init__(self, dyn: TransformerDynamics, actor: Actor, dynamics: bool) -> None:
        self.rssm, self.actor, self.dynamics = dyn, actor, dynamics
        self.post = None

    def starts(self, post: State) -> tuple[State, Memory]:
        return self.rssm.starts(post)

    def imagine(self, start: tuple[State, Memory], horizon: int) -> tuple[State, Tensor, Tensor]:
        """As `Cells.imagine`, from `starts(post)`: states s_0..s_H (H+1, N, ...), actions (H, N, A) and the
        actor's raw outputs (H, N, ...)."""
        state, memory = start
        deter, stoch = state["deter"], state["stoch"]
        n, device = deter.shape[0], deter.device
        deters, stochs, actions, outs = [deter], [stoch], [], []
        for _ in range(horizon):
            act_noise = self.actor.noise(n, device)
            stoch_noise = onehot_noise(stoch.shape, device)
            out = self.actor.params(self.rssm.feat({"deter": deter, "stoch": stoch}).detach())
            action = self.actor.dist(out).rsample(noise=act_noise)
            if not self.dynamics:  # REINFORCE: the rollout must not carry the sample's gradient
                action = action.detach()
            nxt, memory = self.rssm.img_step({"deter": deter, "stoch": stoch}, action, memory, stoch_noise)
            deter, stoch = nxt["deter"], nxt["stoch"]
            deters.append(deter)
            stochs.append(stoch)
            actions.append(action)
            outs.append(out)
        states = {"deter": torch.stack(deters), "stoch": torch.stack(stochs)}
        return states, torch.stack(actions), torch.stack(outs)


@torch.no_grad()
def openloop_features(agent: Dreamer, batch: Mapping[str, Any], context: int) -> tuple[dict[str, Tensor], Tensor]:
    """`openloop.openloop_features` for the transformer: posteriors for the first `context` steps, then the
    prior imagined from the recorded actions alone, each step appended to the KV cache of the real ones."""
    wm = agent.wm
    dyn: TransformerDynamics = wm.rssm
    data = agent.to_inputs(batch)
    state = agent.context_from_batch(batch)
    embed = wm.encoder({k: v[:, :context] for k, v in data.items()})
    prev = torch.cat([state["action"][:, None], data["action"][:, :-1]], 1)
    post, _ = dyn.observe(embed, prev[:, :context], data["is_first"][:, :context], state)
    b = prev.shape[0]
    memory = {"kv": post["kv"], "pos": torch.arange(context, device=prev.device)[None].expand(b, context),
              "valid": post["episode"] == post["episode"][:, -1:],
              "next": torch.full((b,), context, dtype=torch.long, device=prev.device)}
    keep_n = dyn.tcfg.context - 1
    memory = {**memory, "kv": memory["kv"][..., -keep_n:, :], "pos": memory["pos"][:, -keep_n:],
              "valid": memory["valid"][:, -keep_n:]}
    deters, stochs = [post["deter"]], [post["stoch"]]
    current = {"deter": post["deter"][:, -1], "stoch": post["stoch"][:, -1]}
    for t in range(context, data["action"].shape[1]):
        first = data["is_first"][:, t]  # a new episode cannot be predicted; reset as the model does
        current["deter"], memory = dyn.act_step({**current, **memory}, prev[:, t], first)
        logp = dyn.prior_logp(current["deter"])
        current["stoch"] = sample_onehot(logp)
        deters.append(current["deter"][:, None])
        stochs.append(current["stoch"][:, None])
    feat = wm.rssm.feat({"deter": torch.cat(deters, 1), "stoch": torch.cat(stochs, 1)})
    return data, feat

