"""The World Models policy a robot runs: V's encoder, M's LSTM state and the linear C, from a blob alone.

Each control step: z from the frame (V), a = C([z, h]), and then h steps on (z, a) through M's LSTM: that
last part needs no new observation, so `prepare()` runs it between ticks. Until C has been evolved (the
blob's `controller.evolved` is 0) the policy acts with the random policy that collects World Models' first
data: smooth, a' = clip(a + sqrt(dt) N(0, 1)), or uniform. The trainer acts through the same class,
sharing its live modules (`Policy.from_modules`), so its policy follows every stage without an export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.agents.blob import PolicyBlob, blob_meta
from core.agents.blob import check_declared_network as check_blob_network
from core.agents.spaces import ActSpace, ObsSpace
from core.agents.world_models import controller
from core.agents.world_models.memory import Memory, State
from core.agents.world_models.vision import Encoder, frames
from core.config.world_models import WorldModelsConfig
from core.layout import StepLayout

ALGORITHM = "world_models"  # its name in the registry, the config and a policy blob
MAX_PARAMS = 100_000_000  # far above the reference sizes (car racing: ~4.4M, most of it V's decoder, not acted with)


class Controller(nn.Module):
    """C's flat parameters (what CMA-ES searches) and whether they have been evolved yet."""

    def __init__(self, z: int, units: int, act: ActSpace) -> None:
        super().__init__()
        self.features, self.act_dim, self.discrete = z + units, act.dim, act.discrete
        self.register_buffer("params", torch.zeros(controller.parameter_count(z, units, act.dim)))
        self.register_buffer("evolved", torch.zeros((), dtype=torch.uint8))

    def forward(self, features: Tensor) -> Tensor:
        weight, bias = controller.split(self.params, self.features, self.act_dim)
        return controller.act(features, weight, bias, self.discrete)


class PolicyNet(nn.Module):
    """What acting needs, named as the blob's tensors: encoder.*, memory.*, controller.*."""

    def __init__(self, cfg: WorldModelsConfig, act: ActSpace) -> None:
        super().__init__()
        self.encoder = Encoder(cfg.z, cfg.vae_depth)
        self.memory = Memory(cfg.z, act.dim, cfg.lstm)
        self.controller = Controller(cfg.z, cfg.lstm, act)


class Policy:
    """`reset()`, then `act(obs)` once per control step (`core.agents.interface.Policy`)."""

    def __init__(self, cfg: WorldModelsConfig, space: ObsSpace, act: ActSpace, net: nn.Module,
                 device: torch.device, version: int = 0) -> None:
        self.cfg, self.space, self.act_space = cfg, StepLayout.of(space), act
        self.encoder, self.memory, self.controller = net.encoder, net.memory, net.controller
        self.device, self.version = device, version
        self.generator = np.random.default_rng(0)
        self.torch_generator = torch.Generator(device=device).manual_seed(0)
        self.state: State | None = None
        self.pending: tuple[Tensor, Tensor] | None = None  # (z, a) of the last act(), not yet stepped into M
        self.random_action: np.ndarray | None = None  # the smooth random policy's last action
        self.last_action: np.ndarray | None = None

    # --- construction
    @classmethod
    def from_modules(cls, cfg: WorldModelsConfig, space: ObsSpace, act: ActSpace, net: nn.Module) -> Policy:
        """The trainer's policy: shares its live encoder, LSTM and controller."""
        return cls(cfg, space, act, net, next(net.parameters()).device)

    @classmethod
    def from_blob(cls, blob: PolicyBlob, device: str | torch.device = "cpu") -> Policy:
        """Build the policy a `core.agents.read_policy` blob describes; ValueError, before anything is allocated,
        if it is another algorithm's or its tensors are not the network its config declares."""
        if blob.algorithm != ALGORITHM:
            raise ValueError(f"a policy blob of algorithm {blob.algorithm!r}, not {ALGORITHM!r}")
        check_declared_network(blob.config, blob.act_space, blob.tensors)
        net = PolicyNet(blob.config, blob.act_space)
        net.load_state_dict(blob.tensors)
        net.to(device).eval()
        return cls(blob.config, blob.space, blob.act_space, net, torch.device(device), blob.version)

    @staticmethod
    def read_config(config: Any, space: ObsSpace, act: ActSpace) -> WorldModelsConfig:
        """The world_models config a blob declares, validated, with its image in the observation space
        (ValueError naming the field)."""
        cfg = WorldModelsConfig.model_validate(config)
        if why := image_problem(cfg, space):
            raise ValueError(why)
        return cfg

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.cfg.image_key,)

    # --- acting
    def reset(self, batch: int = 1) -> None:
        self.state = self.memory.initial(batch, self.device)
        self.pending, self.random_action = None, None

    @torch.inference_mode()
    def prepare(self) -> None:
        """Step M's LSTM on the last (z, a): all the next act() needs besides its frame."""
        if self.pending is not None and self.state is not None:
            self.state = self.memory(*self.pending, self.state)
            self.pending = None

    @torch.inference_mode()
    def act(self, obs: Mapping[str, Any], mode: str = "sample", noise: float = 0.0, batched: bool = False) -> Any:
        """One control step. mode: sample (z drawn from V's posterior, C's action with `collect_noise`
        added) or mode (z = V's mean, C's action as it is); noise: more Gaussian exploration."""
        if mode not in ("sample", "mode"):
            raise ValueError(f"mode must be 'sample' or 'mode', not {mode!r}")
        if not batched:
            obs = {k: np.asarray(v)[None] for k, v in obs.items()}
        first = np.asarray(obs["is_first"], bool).reshape(-1)
        if self.state is None or self.state[0].shape[0] != len(first):
            self.reset(len(first))
        self.prepare()
        keep = torch.as_tensor(~first, device=self.device, dtype=torch.float32)[:, None]
        self.state = (self.state[0] * keep, self.state[1] * keep)  # an episode start: M starts afresh
        mean, logvar = self.encoder(frames(obs[self.cfg.image_key], self.device))
        z = mean
        if mode == "sample":
            eps = torch.randn(mean.shape, generator=self.torch_generator, device=self.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        if bool(self.controller.evolved):
            action = self.controller(torch.cat([z, self.state[0]], -1))
            action = self._explore(action, (self.cfg.collect_noise if mode == "sample" else 0.0) + noise)
        else:
            action = torch.as_tensor(self._random(first), device=self.device)
        self.pending = (z, action)
        self.last_action = action.cpu().numpy()
        env = self.last_action.argmax(-1).astype(np.int64) if self.act_space.discrete else self.last_action
        return env if batched else env[0]

    def _explore(self, action: Tensor, noise: float) -> Tensor:
        if noise <= 0 or self.act_space.discrete:
            return action
        jitter = torch.as_tensor(self.generator.normal(0.0, noise, action.shape), dtype=torch.float32)
        return (action + jitter.to(action.device)).clamp(-1.0, 1.0)

    def _random(self, first: np.ndarray) -> np.ndarray:
        """The random policy's actions (batch, act): uniform at an episode start and for `uniform`; else one
        step of the smooth random walk from the last one."""
        rng, act = self.generator, self.act_space
        fresh = np.stack([act.random(rng) for _ in first])
        if act.discrete or self.cfg.random_policy == "uniform" or self.random_action is None:
            self.random_action = fresh
            return fresh
        walk = np.clip(self.random_action + math.sqrt(self.cfg.smooth_dt) * rng.standard_normal(fresh.shape), -1, 1)
        self.random_action = np.where(first[:, None], fresh, walk).astype(np.float32)
        return self.random_action

    def context(self) -> dict[str, np.ndarray]:
        """M's LSTM state before the last act()'s step (batch first)."""
        assert self.state is not None, "context() after act()"
        return {"h": self.state[0].cpu().numpy(), "c": self.state[1].cpu().numpy()}

    def take_state(self, previous: object) -> None:
        """Carry on the LSTM state of the World Models policy this one replaces (same architecture)."""
        if (isinstance(previous, Policy) and previous.state is not None and self.cfg.lstm == previous.cfg.lstm
                and self.cfg.z == previous.cfg.z):
            self.state, self.pending, self.random_action = previous.state, previous.pending, previous.random_action


# --- the weights blob
def image_problem(cfg: WorldModelsConfig, space: ObsSpace) -> str | None:
    """Why V cannot read this observation space (no such image, or not uint8 H x W x 3), else None."""
    if cfg.image_key not in space:
        images = [k for k, (shape, dtype) in space.items() if len(shape) == 3 and dtype == "uint8"]
        return (f"world_models.image_key: {cfg.image_key!r} is not an observation here (images: {images or 'none'}); "
                "World Models acts from pixels: give the task a camera")
    shape, dtype = space[cfg.image_key]
    if len(shape) != 3 or shape[-1] != 3 or dtype != "uint8":
        return f"world_models.image_key: {cfg.image_key!r} is {dtype} {list(shape)}, not a uint8 H x W x 3 image"
    return None


def check_declared_network(cfg: WorldModelsConfig, act: ActSpace, tensors: Mapping[str, Tensor]) -> None:
    """The shared blob check (`core.agents.blob.check_declared_network`) on the network a world_models config
    declares."""
    check_blob_network(lambda: PolicyNet(cfg, act), tensors, name="world_models", max_params=MAX_PARAMS,
                                declared=f"z {cfg.z}, lstm {cfg.lstm}, vae_depth {cfg.vae_depth}")


def policy_weights(net: nn.Module, cfg: WorldModelsConfig, space: ObsSpace, act: ActSpace,
                   version: int) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of the policy blob: the acting modules of `net` (encoder, memory, controller)."""
    tensors = {}
    for name in ("encoder", "memory", "controller"):
        for key, value in getattr(net, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return tensors, blob_meta(ALGORITHM, cfg.model_dump(mode="json"), space, act, version)
