"""Open-loop prediction: the world model sees the first frames of replayed sequences, then imagines the
rest from the recorded actions alone (`learner.openloop` writes them as truth / prediction / error videos;
`reverie-replay eval` measures every head's error against the horizon from the same features)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from learner.agents.dreamer.agent import Dreamer


@torch.no_grad()
def openloop_features(agent: Dreamer, batch: Mapping[str, Any], context: int) -> tuple[dict[str, Tensor], Tensor]:
    """(model inputs, features (B, T, F)): posterior features for the first `context` steps, then the prior's
    imagined from the recorded actions alone."""
    if agent.cfg.dynamics == "transformer":
        from learner.agents.dreamer.transformer_cells import openloop_features as transformer_openloop

        return transformer_openloop(agent, batch, context)
    wm = agent.wm
    data = agent.to_inputs(batch)
    state = agent.context_from_batch(batch)
    embed = wm.encoder({k: v[:, :context] for k, v in data.items()})
    prev = torch.cat([state["action"][:, None], data["action"][:, :-1]], 1)
    post, _ = wm.rssm.observe(embed, prev[:, :context], data["is_first"][:, :context], state)
    states = [{k: post[k][:, t] for k in ("deter", "stoch")} for t in range(context)]
    current = states[-1]
    for t in range(context, data["action"].shape[1]):
        keep = (1.0 - data["is_first"][:, t])[:, None]  # a new episode cannot be predicted; reset as the model does
        current = {"deter": current["deter"] * keep, "stoch": current["stoch"] * keep[..., None]}
        current = wm.rssm.img_step(current, prev[:, t] * keep)
        states.append(current)
    return data, wm.rssm.feat({k: torch.stack([s[k] for s in states], 1) for k in ("deter", "stoch")})


@torch.no_grad()
def openloop(agent: Dreamer, batch: Mapping[str, Any], context: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) uint8 (B, T, H, W, C) for the first image key of a replay batch."""
    key = agent.model.keys.images[0]
    data, feat = openloop_features(agent, batch, context)
    pred = agent.wm.decoder(feat)[key].float()
    to_uint8 = lambda x: ((x + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # noqa: E731
    return to_uint8(data[key]), to_uint8(pred)
