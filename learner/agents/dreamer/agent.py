"""One Dreamer update: world model on replayed sequences, then actor and critic in imagination.

Everything is summed into one loss with one backward pass; gradient isolation comes from
detaching, not from separate passes: the actor and critic see `sg(features)` (except for the
2023 recipe's dynamics backpropagation, where the world model's parameters are frozen during
imagination instead), and the world model receives gradients only from its own loss and, when
enabled, from the replay value loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.agents.dreamer.policy import CONTEXT_KEYS, Policy, policy_weights
from core.agents.dreamer.preprocess import ObsKeys, preprocess
from core.agents.dreamer.rssm import State
from core.agents.spaces import ActSpace, ObsSpace
from core.config import Config
from core.config.agent import DreamerConfig
from core.config.explore import ExploreConfig
from core.layout import StepLayout
from learner.agents.dreamer.behavior import Behavior
from learner.agents.dreamer.cells import Cells, compile_mode
from learner.agents.dreamer.explore import Exploration
from learner.agents.dreamer.openloop import openloop
from learner.agents.dreamer.optim import make_optimizer
from learner.agents.dreamer.transformer_cells import TransformerCells
from learner.agents.dreamer.world_model import WorldModel

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("dreamer.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `dreamer.precision` on `device`; None = plain float32."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters take no gradient inside the block (activations still carry it)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class DreamerModel(nn.Module):
    """World model + behaviour: every trainable weight of the agent."""

    def __init__(self, cfg: DreamerConfig, space: ObsSpace, act: ActSpace) -> None:
        super().__init__()
        self.cfg, self.space, self.act_space = cfg, StepLayout.of(space), act
        self.keys = ObsKeys.select(space, cfg.image_keys, cfg.vector_keys)
        self.wm = WorldModel(cfg, space, self.keys, act)
        self.behavior = Behavior(cfg, self.wm.feat_dim, act, self.wm.rssm.feat_cols)


class Dreamer:
    """The trainer: owns the model, the optimiser and the update counter (`core.agents.Agent`)."""

    def __init__(self, cfg: DreamerConfig, space: ObsSpace, act: ActSpace, device: torch.device | None = None,
                 explore: ExploreConfig | None = None) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = DreamerModel(cfg, space, act).to(self.device)
        # Convolution weights in channels-last memory, as the images arrive (NHWC): the encoder's and
        # decoder's small-channel 5x5 convolutions then run NHWC kernels forward and backward, on
        # CPU 1.3-2x faster per layer than NCHW (pixels, size1m: ~20 % of an update). Same results.
        self.model.to(memory_format=torch.channels_last)
        self.wm, self.behavior = self.model.wm, self.model.behavior
        self.optimizer = make_optimizer(cfg, self.wm, self.behavior.actor, self.behavior.critic)
        self.updates = 0
        self.skipped = 0  # updates refused for non-finite inputs, losses or gradients (this process)
        mode = compile_mode(cfg, self.device) if cfg.dynamics == "rssm" else "off"  # the config refuses others
        if cfg.dynamics == "transformer":
            self.cells = TransformerCells(self.wm.rssm, self.behavior.actor, self.behavior.uses_dynamics_grad())
        else:
            self.cells = Cells(self.wm.rssm, self.behavior.actor, self.behavior.uses_dynamics_grad(), mode == "cell")
        self._update_fn = self._update
        # dreamer.explore: the ensemble and explorers join the model and the optimiser (explore.py)
        self.exploration = None if cfg.explore == "none" else Exploration(self, explore or ExploreConfig())
        if self.exploration is not None:
            self._update_fn = self.exploration.update
        if mode == "full":
            self._update_fn = torch.compile(self._update_fn)

    # --- the agent interface (core.agents.interface.Agent)
    @classmethod
    def from_config(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> Dreamer:
        return cls(cfg.dreamer, space, act, explore=cfg.explore)

    @classmethod
    def parameter_count(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> int:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            if cfg.dreamer.explore != "none":  # the ensemble and explorers count too
                return sum(p.numel() for p in cls(cfg.dreamer, space, act, torch.device("meta"),
                                                  cfg.explore).model.parameters())
            model = DreamerModel(cfg.dreamer, space, act)
        return sum(p.numel() for p in model.parameters())

    @property
    def replay_context(self) -> bool:
        return self.cfg.replay_context

    @property
    def image_keys(self) -> tuple[str, ...]:
        return self.model.keys.images

    def policy(self) -> Policy:
        if self.exploration is not None:  # collecting: the explorer acts
            return self.exploration.policy()
        return Policy.from_model(self.model)

    def policy_weights(self) -> tuple[dict[str, Tensor], dict]:
        if self.exploration is not None:
            return self.exploration.policy_weights()
        return policy_weights(self.model, self.updates)

    def openloop(self, batch: Mapping[str, Any], context: int) -> tuple[np.ndarray, np.ndarray]:
        return openloop(self, batch, context)

    # --- data
    def initial_context(self, batch: int) -> State:
        state = self.wm.rssm.initial(batch, self.device)
        state["action"] = torch.zeros(batch, self.model.act_space.dim, device=self.device)
        return state

    def context_from_batch(self, batch: dict) -> State:
        """Start states of replayed sequences: stored latents where valid, else the initial state."""
        b = batch["action"].shape[0]
        state = self.initial_context(b)
        valid = batch.get("context/valid")
        if not self.cfg.replay_context or valid is None or "context/deter" not in batch:
            return state  # nothing written back yet (first updates) or the 2023 recipe
        mask = torch.as_tensor(valid, device=self.device).float()
        for key in CONTEXT_KEYS:
            stored = torch.as_tensor(batch[f"context/{key}"], device=self.device).float()
            state[key] = stored * mask.reshape(-1, *[1] * (stored.ndim - 1))
        return state

    def to_inputs(self, batch: dict) -> dict[str, Tensor]:
        data = preprocess(batch, self.model.keys, self.device)
        data["action"] = torch.as_tensor(batch["action"], device=self.device).float()
        return data

    # --- update
    def train(self, batch: dict) -> tuple[dict[str, float | Tensor], dict[str, Tensor]]:
        """One update on a replay batch (numpy or tensors, (B, T, ...)).

        Returns metrics (tensors; read them lazily to avoid host syncs) and the posterior latents
        (B, T, ...) to write back into replay as the context of later samples.

        An update with a non-finite input, loss or gradient is not applied: parameters, optimiser
        state and return normalisation stay as they were, `skipped` counts it, a warning names the
        culprits, and it returns ({"skipped_nonfinite": 1.0}, {}) (no latents to write back).
        """
        if bad := _nonfinite_inputs(batch):
            return self._skip(f"input {', '.join(map(repr, bad))} holds NaN or inf")
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}  # the forward pass moves them
        data = self.to_inputs(batch)
        start = self.context_from_batch(batch)
        self.model.train()
        with autocast(self.cfg.precision, self.device):
            loss, post, metrics = self._update_fn(data, start)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not self._finite(loss):
            problem = self._diagnose(metrics)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])
            return self._skip(problem)
        norms = self.optimizer.step()
        if isinstance(norms, dict):
            metrics.update({f"grad_norm/{k}": v for k, v in norms.items()})
        self.behavior.update_slow(self.updates)
        self.updates += 1
        context = {"deter": post["deter"].detach().float(), "stoch": post["stoch"].detach().float(),
                   "action": data["action"]}
        return metrics, context

    def _finite(self, loss: Tensor) -> bool:
        """Loss and every gradient finite: one fused norm over the gradients and one host sync."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = [n.float().reshape(()) for n in torch._foreach_norm(grads)] if grads else []
        return bool(torch.isfinite(torch.stack([loss.detach().float().reshape(()), *norms])).all())

    def _diagnose(self, metrics: Mapping[str, Any]) -> str:
        losses = [k for k, v in metrics.items() if isinstance(v, Tensor) and not bool(torch.isfinite(v).all())]
        grads = [n for n, p in self.model.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        parts = [f"non-finite {'loss' if len(losses) == 1 else 'losses'} {', '.join(losses[:6]) or '(none)'}"]
        if grads:
            parts.append(f"non-finite gradients in {len(grads)} tensor(s) ({', '.join(grads[:3])}"
                         f"{', ...' if len(grads) > 3 else ''})")
        return "; ".join(parts)

    def _skip(self, problem: str) -> tuple[dict[str, float | Tensor], dict[str, Tensor]]:
        self.skipped += 1
        n = self.skipped
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th ...: loud, yet bounded if the data keeps doing it
            log.warning("dreamer: update %d skipped: %s; parameters, optimiser state and return normalisation "
                        "unchanged (%d update(s) skipped so far)", self.updates + 1, problem, n)
        return {"skipped_nonfinite": 1.0}, {}

    def nonfinite_parameters(self) -> list[str]:
        """Names of the model's parameters and buffers holding NaN or inf: such weights must never be
        published to robots or written to a checkpoint."""
        state = self.model.state_dict()
        if not state:
            return []
        finite = torch.stack([torch.isfinite(v).all() for v in state.values()]).tolist()
        return [name for name, ok in zip(state, finite) if not ok]

    def refuse_nonfinite(self, refused: str) -> bool:
        """True, with an error logged, when the model holds NaN or inf: then a checkpoint, the policy file
        or weights for the robots must not be written or sent (they would replace good ones). `refused`
        says which, e.g. "checkpoint at 500 env steps not written"."""
        bad = self.nonfinite_parameters()
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            log.error("%s: the model holds NaN or inf in %d tensor(s) (%s%s) after %d updates; the previous "
                      "ones are kept", refused, len(bad), ", ".join(bad[:3]), more, self.updates)
        return bool(bad)

    def _update(self, data: dict[str, Tensor], start: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        cfg, wm, beh = self.cfg, self.wm, self.behavior
        wm_loss, post, metrics = wm.loss(data, start, self.cells.post)
        b, t = data["action"].shape[:2]
        if self.cfg.dynamics == "transformer":  # each start with its window of keys and values
            flat = self.cells.starts(post)
        else:
            flat = {k: post[k].detach().reshape(b * t, *post[k].shape[2:]) for k in ("deter", "stoch")}
        # World-model weights are constants here. Under REINFORCE no input of the dynamics or heads
        # carries a gradient, so they build no graph; only the actor's steps do.
        with frozen(wm):
            states, actions, outs = self.cells.imagine(flat, cfg.imag_horizon)
            feat = wm.rssm.feat(states)
            # The heads' values of the start state are not used: it is real, its continuation comes
            # from the data and its reward never counts (a return starts with the next state's). They
            # still run on it: slicing their 16 x 1024 x 1536 input instead costs more (its gradient is
            # a zero-filled full-size copy) than the 1024 extra rows.
            reward, cont_logit = wm.heads(feat)
        reward = reward.mean()
        reward = torch.cat([torch.zeros_like(reward[:1]), reward[1:]], 0)
        # 2023: the head's mode, 0 or 1 with no gradient (with dynamics backprop, a probability would
        # let the actor lower the predicted continuation to escape negative rewards).
        imag_cont = torch.sigmoid(cont_logit[1:]) if cfg.imag_cont == "prob" else (cont_logit[1:] > 0).float()
        cont = torch.cat([(1.0 - data["is_terminal"]).reshape(1, -1), imag_cont], 0)
        ac_loss, start_return, ac_metrics = beh.loss(feat.float(), actions, reward, cont,
                                                     policy=beh.actor.dist(outs.float()))
        metrics.update(ac_metrics)
        loss = wm_loss.mean() + ac_loss
        if cfg.repval_scale > 0:
            replay_feat = wm.rssm.feat(post)
            repval = beh.replay_value_loss(replay_feat, data["reward"], data["is_terminal"], data["is_first"],
                                           data["is_last"], start_return.reshape(b, t))
            loss = loss + cfg.repval_scale * repval
            metrics["ac/repval_loss"] = repval.detach()
        metrics["loss"] = loss.detach()
        return loss, post, metrics

    # --- state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])


def _nonfinite_inputs(batch: Mapping[str, Any]) -> list[str]:
    """Batch keys with NaN or inf in a floating-point value (numpy on the host: no device sync)."""
    bad = []
    for key, value in batch.items():
        if isinstance(value, Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(key)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad.append(key)
    return bad
