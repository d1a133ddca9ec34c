"""Gymnasium view of a simulated robot backend: the same code, the standard API."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from core.config import Config, load_config
from core.interface import ArraySpec, DiscreteSpec
from core.layout import FLAG_KEYS
from sim.tasks import default_config, make_robot


def _box(spec: ArraySpec) -> spaces.Box:
    low = np.broadcast_to(np.asarray(spec.low, dtype=np.float64), spec.shape)
    high = np.broadcast_to(np.asarray(spec.high, dtype=np.float64), spec.shape)
    return spaces.Box(low.astype(spec.dtype), high.astype(spec.dtype), spec.shape, spec.dtype)


def to_space(spec: ArraySpec | DiscreteSpec) -> spaces.Space:
    return spaces.Discrete(spec.n) if isinstance(spec, DiscreteSpec) else _box(spec)


class SimEnv(gym.Env):
    """`terminated` is the backend's `is_terminal`; `truncated` is `is_last` without it."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str | None = None,
        config: Config | str | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        render_mode: str | None = None,
    ) -> None:
        if isinstance(config, Config):
            cfg = config
        elif config is not None:
            cfg = load_config(config, overrides)
        elif task is not None:
            cfg = default_config(task, overrides)
        else:
            raise ValueError("SimEnv needs a task name or a config")
        self.cfg = cfg
        self.robot = make_robot(cfg)
        self.render_mode = render_mode
        self._seeded = False
        self.metadata = {**self.metadata, "render_fps": cfg.control.hz}
        self.observation_space = spaces.Dict(
            {k: _box(s) for k, s in self.robot.observation_spec.items() if k not in FLAG_KEYS}
        )
        self.action_space = to_space(self.robot.action_spec)

    def _strip(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in obs.items() if k not in FLAG_KEYS}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is None and not self._seeded:
            seed = self.cfg.seed  # an unseeded first reset still follows the config's seed
        self._seeded = True
        obs = self.robot.reset(seed=seed)
        return self._strip(obs), {}

    def step(self, action: Any):
        self.robot.send(action)
        obs = self.robot.observe()
        terminated = bool(obs["is_terminal"])
        truncated = bool(obs["is_last"]) and not terminated
        return self._strip(obs), float(obs["reward"]), terminated, truncated, dict(self.robot.info)

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self.robot.render_frame()
        return None

    def close(self) -> None:
        self.robot.close()
