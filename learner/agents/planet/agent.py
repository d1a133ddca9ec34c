"""PlaNet's trainer (`core.agents.Agent`): one Adam update of the model per replayed batch; no actor, no
critic, no replay context. The policy it exports is the planner (`core.agents.planet.policy`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.agents.dreamer.preprocess import preprocess
from core.agents.planet.net import continuous_problem
from core.agents.planet.policy import Policy, policy_weights
from core.agents.spaces import ActSpace, ObsSpace
from core.config import Config
from core.config.planet import PlanetConfig
from learner.agents.dreamer.agent import resolve_device
from learner.agents.planet.model import PlanetModel
from learner.replay.validation import nonfinite_keys

log = logging.getLogger(__name__)


class Planet:
    """The model, its optimiser and the update counter."""

    def __init__(self, cfg: PlanetConfig, space: ObsSpace, act: ActSpace, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = PlanetModel(cfg, space, act).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, eps=cfg.eps)
        self.updates = 0
        self.skipped = 0

    # --- the agent interface
    @classmethod
    def from_config(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> Planet:
        return cls(cfg.planet, space, act)

    @classmethod
    def parameter_count(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> int:
        if why := continuous_problem(act):
            raise ValueError(why)
        with torch.device("meta"):
            model = PlanetModel(cfg.planet, space, act)
        return sum(p.numel() for p in model.parameters())

    @property
    def replay_context(self) -> bool:
        return False  # sequences start from the zero state, as in the official code

    @property
    def image_keys(self) -> tuple[str, ...]:
        return self.model.keys.images

    def policy(self) -> Policy:
        return Policy.from_model(self.model)

    def policy_weights(self) -> tuple[dict[str, Tensor], dict]:
        return policy_weights(self.model, self.updates)

    @torch.no_grad()
    def openloop(self, batch: Mapping[str, Any], context: int) -> tuple[np.ndarray, np.ndarray]:
        """The first image key: the model observes `context` steps, then imagines the rest from the actions."""
        model, key = self.model, self.model.keys.images[0]
        data = self.to_inputs(batch)
        post, _, prev = model.observe({k: v[:, :context] for k, v in data.items()})
        feats = [model.rssm.feat(post)]
        state = {k: post[k][:, -1] for k in ("deter", "stoch")}
        for t in range(context, data["action"].shape[1]):
            keep = (1.0 - data["is_first"][:, t])[:, None]  # a new episode cannot be predicted: reset as observing does
            state = model.rssm.img_step({k: v * keep for k, v in state.items()}, data["action"][:, t - 1] * keep)
            feats.append(model.rssm.feat(state)[:, None])
        pred = model.decoder(torch.cat(feats, 1))[key].float()
        to_uint8 = lambda x: ((x + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # noqa: E731
        return to_uint8(data[key]), to_uint8(pred)

    # --- update
    def to_inputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        data = preprocess(batch, self.model.keys, self.device)
        data["action"] = torch.as_tensor(np.asarray(batch["action"]), device=self.device).float()
        data["reward"] = torch.as_tensor(np.asarray(batch["reward"]), device=self.device).float()
        return data

    def train(self, batch: Mapping[str, Any]) -> tuple[dict[str, float | Tensor], None]:
        """One update on a replay batch (B, T, ...). An update with a non-finite input, loss or gradient is not
        applied (`skipped` counts it and a warning names the culprit)."""
        arrays = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, Tensor)}
        if bad := nonfinite_keys(arrays):
            return self._skip(f"input {', '.join(map(repr, bad))} holds NaN or inf")
        self.model.train()
        loss, _, metrics = self.model.loss(self.to_inputs(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        if not bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(f"non-finite loss ({float(loss):.3g}) or gradient norm ({float(norm):.3g})")
        self.optimizer.step()
        self.updates += 1
        return {**metrics, "loss": loss.detach(), "grad_norm/model": norm}, None

    def _skip(self, problem: str) -> tuple[dict[str, float | Tensor], None]:
        self.skipped += 1
        n = self.skipped
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th ...: loud, yet bounded
            log.warning("planet: update %d skipped: %s; parameters and optimiser state unchanged (%d skipped so far)",
                        self.updates + 1, problem, n)
        return {"skipped_nonfinite": 1.0}, None

    def refuse_nonfinite(self, refused: str) -> bool:
        """True, with an error logged, when the model holds NaN or inf (nothing may be written from it)."""
        bad = [name for name, v in self.model.state_dict().items() if not bool(torch.isfinite(v).all())]
        if bad:
            log.error("%s: the model holds NaN or inf in %d tensor(s) (%s) after %d updates; the previous ones are "
                      "kept", refused, len(bad), ", ".join(bad[:3]), self.updates)
        return bool(bad)

    # --- state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
