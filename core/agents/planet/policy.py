"""PlaNet's policy: the planner is the policy. act() updates the belief (the RSSM posterior) with the
observation, then the cross-entropy method searches action sequences in the model's latent space and the
first action of the plan's mean is executed (model-predictive control).

On a robot it is built from a policy blob alone: the encoder, the RSSM and the reward head (no decoder),
with the planet config that sizes them and the planner's settings. Planning costs
candidates x iterations x horizon x action_repeat RSSM steps per plan, far more than an actor's one
forward pass: the robot measures act() before using a policy (`robot.runner.act_time_problem`), and
`cost_settings` names what shrinks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.agents.blob import PolicyBlob, blob_meta, declared_bounds_problem
from core.agents.blob import check_declared_network as check_blob_network
from core.agents.dreamer.preprocess import preprocess
from core.agents.planet.cem import plan
from core.agents.planet.net import ALGORITHM, PlanetNet, continuous_problem
from core.agents.spaces import ActSpace, ObsSpace
from core.config.planet import PlanetConfig
from core.layout import StepLayout

PREFIXES = ("encoder.", "rssm.", "reward.")  # the acting modules' tensors in a blob (the decoder stays home)
CONTEXT_KEYS = ("deter", "stoch", "action")

# What a policy blob may declare (see core/agents/dreamer/policy.py for why a blob's declaration is bounded
# before anything is built). Planning settings are bounded by the config itself.
MAX_PARAMS = 100_000_000
MAX_WIDTH = 1 << 14  # planet.deter, hidden, stoch, units, cnn_depth
MAX_LAYERS = 16  # planet.head_layers, mlp_layers; entries of cnn_mults
MAX_MULT = 64
MAX_PATTERN = 256


class Policy:
    """`reset()`, then `act(obs)` once per control step: the belief is updated every step, a plan is made
    every `action_repeat` steps (and at an episode's first), and its first action is held in between."""

    def __init__(self, cfg: PlanetConfig, space: ObsSpace, act: ActSpace, net: PlanetNet, device: torch.device,
                 version: int = 0) -> None:
        self.cfg, self.space, self.act_space = cfg, StepLayout.of(space), act
        self.net, self.keys = net, net.keys
        self.device, self.version = device, version
        self.generator = np.random.default_rng(0)
        self.state: dict[str, Tensor] | None = None
        self.hold = np.zeros(0, np.int64)  # steps the current action is still held, per row
        self.last_action: np.ndarray | None = None

    # --- construction
    @classmethod
    def from_model(cls, net: PlanetNet) -> Policy:
        """The trainer's policy: acts with the live modules of its model."""
        return cls(net.cfg, net.space, net.act_space, net, next(net.parameters()).device)

    @classmethod
    def from_blob(cls, blob: PolicyBlob, device: str | torch.device = "cpu") -> Policy:
        """Build the policy a `core.agents.read_policy` blob describes; ValueError, before anything is allocated,
        if it is another algorithm's or its tensors are not the network its config declares."""
        if blob.algorithm != ALGORITHM:
            raise ValueError(f"a policy blob of algorithm {blob.algorithm!r}, not {ALGORITHM!r}")
        check_declared_network(blob.config, blob.space, blob.act_space, blob.tensors)
        net = PlanetNet(blob.config, blob.space, blob.act_space)
        net.load_state_dict(blob.tensors)
        net.to(device).eval()
        return cls(blob.config, blob.space, blob.act_space, net, torch.device(device), blob.version)

    @staticmethod
    def read_config(config: Any, space: ObsSpace, act: ActSpace) -> PlanetConfig:
        """The planet config a blob declares, validated and within the bounds above (ValueError naming the field)."""
        cfg = PlanetConfig.model_validate(config)
        if why := declared_problem(cfg) or continuous_problem(act):
            raise ValueError(why)
        return cfg

    @property
    def inputs(self) -> tuple[str, ...]:
        return (*self.keys.images, *self.keys.vectors)

    @property
    def cost_settings(self) -> str:
        """What sets act()'s cost, as the settings to lower (the robot's refusal names them)."""
        c = self.cfg
        return (f"planet.candidates ({c.candidates}), planet.iterations ({c.iterations}) or planet.horizon "
                f"({c.horizon}); planet.action_repeat ({c.action_repeat}) multiplies the horizon's steps")

    # --- acting
    def reset(self, batch: int = 1) -> None:
        self.state = self.net.rssm.initial(batch, self.device)
        self.state["action"] = torch.zeros(batch, self.act_space.dim, device=self.device)
        self.hold = np.zeros(batch, np.int64)

    def prepare(self) -> None:
        """Nothing to do before the observation: the plan starts from the belief the observation updates."""

    @torch.inference_mode()
    def act(self, obs: Mapping[str, Any], mode: str = "sample", noise: float = 0.0, batched: bool = False) -> Any:
        """One control step. mode: sample (collecting: the plan's action plus `planet.explore` noise) or mode
        (evaluation: the plan's action); `noise` adds to the exploration noise."""
        if mode not in ("sample", "mode"):
            raise ValueError(f"mode must be 'sample' or 'mode', not {mode!r}")
        if not batched:
            obs = {k: np.asarray(v)[None] for k, v in obs.items()}
        batch = len(np.asarray(obs["is_first"]))
        if self.state is None or self.state["deter"].shape[0] != batch:
            self.reset(batch)
        data = preprocess(obs, self.keys, self.device)
        embed = self.net.encoder({k: v[:, None] for k, v in data.items()})[:, 0]
        is_first = data["is_first"].reshape(batch)
        rssm = self.net.rssm
        deter = rssm.observed_deter(self.state, self.state["action"], is_first)
        post = rssm.post_from_parts(deter, rssm.post_deter_part(deter), rssm.post_embed_part(embed))
        due = (self.hold <= 0) | is_first.cpu().numpy().astype(bool)
        action = self.state["action"] * (1.0 - is_first[:, None])
        if due.any():
            planned = self._explore(self.plan(post)[:, 0], (self.cfg.explore if mode == "sample" else 0.0) + noise)
            action = torch.where(torch.as_tensor(due, device=self.device)[:, None], planned, action)
            self.hold[due] = self.cfg.action_repeat
        self.hold -= 1
        self.state = {"deter": post["deter"], "stoch": post["stoch"], "action": action}
        self.last_action = action.cpu().numpy()
        out = self.last_action.astype(np.float32)
        return out if batched else out[0]

    def plan(self, start: dict[str, Tensor]) -> Tensor:
        """The CEM plan (B, horizon, A) from posterior states (B, ...); its first action is the one to take."""
        c = self.cfg
        return plan(lambda actions: self.net.imagined_returns(start, actions, c.action_repeat),
                    start["deter"].shape[0], c.horizon, self.act_space.dim, iterations=c.iterations,
                    candidates=c.candidates, top_k=c.top_k, device=self.device)

    def _explore(self, action: Tensor, noise: float) -> Tensor:
        """Gaussian exploration noise, then the action bounds again."""
        if noise > 0:
            jitter = torch.as_tensor(self.generator.normal(0.0, noise, action.shape), dtype=torch.float32)
            action = action + jitter.to(action.device)
        return action.clamp(-1.0, 1.0)

    def context(self) -> dict[str, np.ndarray]:
        """The posterior latents act() just computed and the action taken (batch first)."""
        assert self.state is not None, "context() after act()"
        return {key: self.state[key].detach().float().cpu().numpy() for key in CONTEXT_KEYS}

    def take_state(self, previous: object) -> None:
        """Carry on the belief and the held action of the PlaNet policy this one replaces (newer weights)."""
        if isinstance(previous, Policy) and previous.state is not None:
            self.state, self.hold = previous.state, previous.hold


# --- the weights blob
def declared_problem(cfg: PlanetConfig) -> str | None:
    """Why the network a blob declares is over the bounds (naming the planet field), else None."""
    limits = {"deter": MAX_WIDTH, "hidden": MAX_WIDTH, "stoch": MAX_WIDTH, "units": MAX_WIDTH,
              "cnn_depth": MAX_WIDTH, "head_layers": MAX_LAYERS, "mlp_layers": MAX_LAYERS}
    if problem := declared_bounds_problem(cfg, "planet", limits, MAX_LAYERS, MAX_MULT, MAX_PATTERN):
        return problem
    return None


def check_declared_network(cfg: PlanetConfig, space: ObsSpace, act: ActSpace, tensors: Mapping[str, Tensor]) -> None:
    """The shared blob check (`core.agents.blob.check_declared_network`) on the network a planet config declares."""
    check_blob_network(lambda: PlanetNet(cfg, space, act), tensors, name="planet", max_params=MAX_PARAMS,
                                declared=f"deter {cfg.deter}, stoch {cfg.stoch}, units {cfg.units}")


def policy_weights(net: nn.Module, version: int) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of the policy blob: the acting modules of a trainer's model (`PlanetNet` or one
    that extends it) and the config and spaces that rebuild them."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items() if k.startswith(PREFIXES)}
    return tensors, blob_meta(ALGORITHM, net.cfg.model_dump(mode="json"), net.space, net.act_space, version)
