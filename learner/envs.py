"""Environments the learner trains on, seen as Reverie steps.

A step is a dict: observation keys, `reward`, `is_first`, `is_last`, `is_terminal`. Actions go in
as the model sees them (a vector in [-1, 1], or one-hot when discrete) and are mapped to the
environment's own action space here. Simulated tasks are looked up by name in Gymnasium's
registry (the `sim` package registers them), so `learner` never imports `sim` directly and any
registered Gymnasium environment works the same way.
"""

from __future__ import annotations

import sys
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from tqdm import tqdm

from core.agents.spaces import ActSpace, ObsSpace
from core.config import Config
from core.config.tasks import TASKS
from core.describe import describe_specs, success_rule
from core.interface import ArraySpec, DiscreteSpec, flag_specs
from core.layout import StepLayout

SIM_PREFIX = "sim:"  # "module:id": Gymnasium imports `sim` (which registers the table's gym ids) first
GYM_PREFIX = "gymnasium:"


class EnvError(ValueError):
    """An environment that cannot be trained on, with the reason."""


def env_id(cfg: Config, override: str | None = None) -> str:
    """The Gymnasium id to build: `--env gymnasium:ID`, else the config's gym_id or sim task."""
    if override:
        if not override.startswith(GYM_PREFIX):
            raise EnvError(f"--env {override!r}: expected gymnasium:ID, for example gymnasium:Pendulum-v1")
        return override[len(GYM_PREFIX):]
    if cfg.backend == "gym":
        return str(cfg.gym_id)
    gym_id = TASKS[cfg.task].gym_id if cfg.task in TASKS else None
    if cfg.backend != "sim" or gym_id is None:
        # A real robot is not stepped from here: it streams its experience to a serving learner.
        raise EnvError(
            f"{cfg.name}: `train` steps a simulated task or a Gymnasium env, and this config is a "
            f"{cfg.backend} robot (task {cfg.task!r}); train it with `reverie-learner serve --config ...` here "
            "and `reverie-robot run --config ...` on the robot"
        )
    return SIM_PREFIX + gym_id


class Env:
    """A Gymnasium env adapted to Reverie steps; `reset()` and `step(action)` both return a step."""

    def __init__(self, cfg: Config, override: str | None = None, seed: int = 0, render: bool = False) -> None:
        self.id = env_id(cfg, override)
        kwargs: dict[str, Any] = {"config": cfg} if self.id.startswith(SIM_PREFIX) else {}
        if render and not kwargs:
            kwargs["render_mode"] = "rgb_array"
        try:
            self.env = gym.make(self.id, **kwargs)
        except (gym.error.Error, ImportError) as exc:  # ImportError: the module of a "module:id" is not there
            raise EnvError(f"cannot make Gymnasium env {self.id!r}: {exc}") from None
        self.seed = seed
        self.episodes = 0
        self.info: dict[str, Any] = {}  # the env's info of the last reset or step (e.g. a task's "success")
        self.obs_space = self._obs_space(self.env.observation_space)
        self.act_space, self._act = self._act_space(self.env.action_space)
        self.sim = kwargs.get("config") is not None
        self.render_enabled = render

    def _obs_space(self, space: gym.Space) -> ObsSpace:
        items = space.spaces.items() if isinstance(space, spaces.Dict) else [("vector", space)]
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, sub in items:
            if not isinstance(sub, spaces.Box):
                raise EnvError(f"{self.id}: observation {key!r} is {type(sub).__name__}; only Box is supported")
            dtype = "uint8" if sub.dtype == np.uint8 else "float32"
            out[key] = (tuple(sub.shape), dtype)
        out.update({key: (spec.shape, spec.dtype) for key, spec in flag_specs().items()})
        return StepLayout(out)

    def _act_space(self, space: gym.Space) -> tuple[ActSpace, gym.Space]:
        if isinstance(space, spaces.Discrete):
            return ActSpace(int(space.n), True), space
        if isinstance(space, spaces.Box) and len(space.shape) == 1:
            if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
                raise EnvError(f"{self.id}: action bounds must be finite, found {space.low}..{space.high}")
            return ActSpace(int(space.shape[0]), False), space
        raise EnvError(f"{self.id}: action space {space} is not Discrete or a 1-D Box")

    def _convert(self, obs: Any, reward: float, first: bool, last: bool, terminal: bool) -> dict[str, Any]:
        obs = dict(obs) if isinstance(obs, dict) else {"vector": obs}
        step = {k: np.asarray(v, dtype=np.uint8 if self.obs_space[k][1] == "uint8" else np.float32)
                for k, v in obs.items()}
        step.update(reward=np.float32(reward), is_first=first, is_last=last, is_terminal=terminal)
        return step

    def reset(self) -> dict[str, Any]:
        """A new episode, seeded by the run seed and the episode index (reproducible runs)."""
        obs, self.info = self.env.reset(seed=self.seed + self.episodes)
        self.episodes += 1
        return self._convert(obs, 0.0, True, False, False)

    def step(self, action: np.ndarray) -> dict[str, Any]:
        obs, reward, terminated, truncated, self.info = self.env.step(self.to_env(action))
        return self._convert(obs, float(reward), False, terminated or truncated, terminated)

    def to_env(self, action: np.ndarray) -> Any:
        if self.act_space.discrete:
            return self.act_space.to_env(action)
        return np.asarray(self.act_space.to_env(action, self._act.low, self._act.high), dtype=self._act.dtype)

    def random_action(self, rng: np.random.Generator) -> np.ndarray:
        return self.act_space.random(rng)

    def render(self) -> np.ndarray | None:
        """A frame for videos: the simulator's scene view, or the env's rgb_array render."""
        if self.sim:
            return self.env.unwrapped.robot.render_frame(256, 256)
        if not self.render_enabled:
            return None
        try:
            return self.env.render()
        except gym.error.DependencyNotInstalled as exc:
            # One line above the progress bar (a UserWarning landed inside the bar's line, two lines long).
            tqdm.write(f"{self.id}: no episode videos: {exc}", file=sys.stderr)
            self.render_enabled = False
            return None

    def describe(self, cfg: Config) -> dict[str, Any]:
        """What this env's steps mean (`core.describe`), for the replay's streams.json: a simulated robot's own
        specs (names, units, bounds), else what the Gymnasium spaces say (bounds only)."""
        if self.sim:
            robot = self.env.unwrapped.robot
            return describe_specs(robot.observation_spec, robot.action_spec, hz=cfg.control.hz, task=cfg.task,
                                  success=success_rule(cfg.task, cfg), source=f"simulated robot ({self.id})")
        space = self.env.observation_space
        items = space.spaces.items() if isinstance(space, spaces.Dict) else [("vector", space)]
        obs = {key: ArraySpec(sub.shape, sub.dtype, sub.low, sub.high) for key, sub in items}
        act = self.env.action_space
        action = (DiscreteSpec(int(act.n)) if isinstance(act, spaces.Discrete)
                  else ArraySpec(act.shape, act.dtype, act.low, act.high))
        hz = float(self.env.metadata.get("render_fps") or cfg.control.hz)
        return describe_specs({**obs, **flag_specs()}, action, hz=hz, task=self.id, source=f"Gymnasium env {self.id}")

    def close(self) -> None:
        self.env.close()
