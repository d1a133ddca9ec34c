"""The simulated tasks by name: which class implements each, its Gymnasium id and default config."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config, load_config
from core.interface import DiscreteSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "hardware_configs"


@dataclass(frozen=True)
class TaskEntry:
    module: str
    robot_class: str
    scripted_class: str | None  # a privileged-state controller that solves the task, if any
    gym_id: str
    default_config: str


TASKS: dict[str, TaskEntry] = {
    "arm_reach": TaskEntry("sim.arm_reach", "ArmReach", "ReachScripted", "reverie/ArmReach-v0", "sim_arm_reach.yaml"),
    "arm_pick": TaskEntry("sim.arm_pick", "ArmPick", "PickScripted", "reverie/ArmPick-v0", "sim_arm_pick.yaml"),
    "quadruped_walk": TaskEntry(
        "sim.quadruped_walk", "QuadrupedWalk", None, "reverie/QuadrupedWalk-v0", "sim_quadruped_walk.yaml"
    ),
}


def default_config(task: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(CONFIG_DIR / TASKS[task].default_config, overrides)


def make_robot(cfg: Config) -> Any:
    """Build the simulated robot backend that `cfg.task` names."""
    entry = TASKS[cfg.task]
    return getattr(importlib.import_module(entry.module), entry.robot_class)(cfg)


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
        entry = TASKS[robot.cfg.task]
        if entry.scripted_class is None:
            raise ValueError(f"task {robot.cfg.task!r} has no scripted policy; use --policy random")
        return getattr(importlib.import_module(entry.module), entry.scripted_class)(robot)
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
