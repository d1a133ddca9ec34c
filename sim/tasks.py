"""The simulated tasks by name (the sim rows of `core.config.tasks.TASKS`): robots, controllers, default configs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config, load_config
from core.config.tasks import TASKS as ALL_TASKS
from core.config.tasks import TaskSpec, load
from core.interface import DiscreteSpec
from core.layout import StepLayout

CONFIG_DIR = Path(__file__).resolve().parents[1] / "hardware_configs"
TASKS: dict[str, TaskSpec] = {name: spec for name, spec in ALL_TASKS.items() if spec.backend == "sim"}


def default_config(task: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(CONFIG_DIR / TASKS[task].default_config, overrides)


def make_robot(cfg: Config) -> Any:
    """Build the simulated robot backend that `cfg.task` names."""
    return load(TASKS[cfg.task].factory)(cfg)


Policy = Callable[[dict[str, np.ndarray]], Any]


def make_policy(name: str, robot: Any, seed: int = 0, mode: str = "mode",
                warn: Callable[[str], None] | None = None) -> Policy:
    """`random` (uniform over the action spec), `scripted` (the task's IK controller) or a trained policy file
    acting with its `mode` actions ("mode" or "sample"); `warn` hears what is odd but not fatal about it."""
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
        return learned_policy(Path(name), robot, mode, warn or _warn)
    raise ValueError(f"unknown policy {name!r}: expected 'random', 'scripted' or a policy .safetensors file")


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=4)  # the line that asked for the policy


def learned_policy(path: Path, robot: Any, mode: str = "mode", warn: Callable[[str], None] = _warn) -> Policy:
    """A trained policy file (the learner's policy.safetensors). One that cannot drive this robot is refused;
    one trained on other observations than this config gives (another config's policy) is run with a warning."""
    from core.agents import policy_from_file  # torch loads only when asked for
    from core.weights import CheckpointError
    from robot.runner import policy_misfit, step_spec

    try:
        policy = policy_from_file(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc
    layout, act_space = step_spec(robot)
    if why := policy_misfit(policy, layout, act_space):  # the same check the robot process makes
        raise ValueError(f"{path}: {why}")
    if why := layout_difference(policy.space.observations(), layout.observations()):
        warn(f"{path} was trained on other observations than {robot.cfg.name} gives ({why}): it was made for "
             "another config and acts on what it knows")
    spec = robot.action_spec
    low, high = (None, None) if isinstance(spec, DiscreteSpec) else (spec.low, spec.high)

    def act(obs: dict[str, np.ndarray]) -> Any:
        policy.act(obs, mode=mode)
        return policy.act_space.to_env(policy.last_action[0], low, high)

    return act


def layout_difference(trained: StepLayout, given: StepLayout) -> str | None:
    """What differs between the observations a policy was trained on and those a robot gives, else None."""
    parts = [f"{key!r} {field.dtype.name}{list(field.shape)} is new to it" for key, field in given.items()
             if key not in trained]
    parts += [f"{key!r} {field.dtype.name}{list(field.shape)} is missing" for key, field in trained.items()
              if key not in given]
    parts += [f"{key!r} is {given[key].dtype.name}{list(given[key].shape)}, trained on "
              f"{field.dtype.name}{list(field.shape)}" for key, field in trained.items()
              if key in given and given[key] != field]
    return "; ".join(parts) or None
