"""The simulated tasks by name (the sim rows of `core.config.tasks.TASKS`): robots, controllers, default configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config, load_config
from core.config.tasks import TASKS as ALL_TASKS
from core.config.tasks import TaskSpec, load
from core.interface import DiscreteSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "hardware_configs"
TASKS: dict[str, TaskSpec] = {name: spec for name, spec in ALL_TASKS.items() if spec.backend == "sim"}


def default_config(task: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(CONFIG_DIR / TASKS[task].default_config, overrides)


def make_robot(cfg: Config) -> Any:
    """Build the simulated robot backend that `cfg.task` names."""
    return load(TASKS[cfg.task].factory)(cfg)


Policy = Callable[[dict[str, np.ndarray]], Any]


def make_policy(name: str, robot: Any, seed: int = 0) -> Policy:
    """`random` (uniform over the action spec) or `scripted` (the task's IK controller)."""
    if name == "random":
        rng = np.random.default_rng(seed)
        spec = robot.action_spec
        if isinstance(spec, DiscreteSpec):
            return lambda obs: int(rng.integers(spec.n))
        return lambda obs: rng.uniform(spec.low, spec.high, size=spec.shape).astype(spec.dtype)
    if name == "scripted":
        scripted = TASKS[robot.cfg.task].scripted
        if scripted is None:
            raise ValueError(f"task {robot.cfg.task!r} has no scripted policy; use --policy random")
        return load(scripted)(robot)
    if name.endswith(".safetensors"):
        return learned_policy(Path(name), robot)
    raise ValueError(f"unknown policy {name!r}: expected 'random', 'scripted' or a policy .safetensors file")


def learned_policy(path: Path, robot: Any) -> Policy:
    """A trained policy file (the learner's policy.safetensors) acting with its mode actions."""
    from core.agents import policy_from_file  # torch loads only when asked for
    from core.weights import CheckpointError
    from robot.runner import policy_misfit, step_spec

    try:
        policy = policy_from_file(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc
    if why := policy_misfit(policy, *step_spec(robot)):  # the same check the robot process makes
        raise ValueError(f"{path}: {why}")
    spec = robot.action_spec
    low, high = (None, None) if isinstance(spec, DiscreteSpec) else (spec.low, spec.high)

    def act(obs: dict[str, np.ndarray]) -> Any:
        policy.act(obs, mode="mode")
        return policy.act_space.to_env(policy.last_action[0], low, high)

    return act
