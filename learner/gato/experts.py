"""The scripted experts Gato imitates, and `gato data`: their episodes recorded into replay directories.

A task directory holds what training and evaluation need of one task: `replay/` (a replay store of the
expert's steps, as any run's: observations, the model-form action taken at them, reward and flags),
the resolved config the episodes were recorded with, and `task.json` (the expert's and a uniform random
policy's returns: the two ends of the normalised score). The simulated tasks' experts are their
privileged-state scripted controllers (`sim.tasks`); CartPole-v1's is a hand-tuned linear rule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_bytes
from core.config import RESOLVED_NAME, Config, load_config, write_resolved
from learner.envs import Env
from learner.replay import Replay

TASK_FILE = "task.json"
TASK_FORMAT = "reverie-gato-task-1"
REPLAY_DIR = "replay"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "hardware_configs"
RANDOM_SEED_OFFSET = 1_000_000  # the random policy's episodes start from other states than the expert's


@dataclass(frozen=True)
class SuiteTask:
    """One task of the benchmark suite: a config file of hardware_configs/ and its overrides."""

    config: str
    overrides: tuple[str, ...] = ()

    def load(self, extra: list[str] | tuple[str, ...] = ()) -> Config:
        return load_config(CONFIG_DIR / self.config, [*self.overrides, *extra])


# Both action modes of both arms, and CartPole: five bodies, three action kinds (joint and Cartesian
# vectors, discrete choices), with and without images; and a pair of tasks of one body that only the
# prompt tells apart.
SUITE: dict[str, SuiteTask] = {
    "reach_cartesian": SuiteTask("sim_arm_reach_state.yaml", ("arm_reach.action_mode=cartesian",)),
    "reach_joint": SuiteTask("sim_arm_reach_state.yaml", ("arm_reach.action_mode=joint",)),
    "pick_discrete": SuiteTask("sim_arm_pick.yaml", ("arm_pick.action_mode=discrete",)),
    "pick_cartesian": SuiteTask("sim_arm_pick.yaml", ("arm_pick.action_mode=cartesian",)),
    "cartpole": SuiteTask("gym_cartpole.yaml"),
    # One body, two tasks: the target is fixed and not observed, so only the prompt says which one to reach.
    "reach_fixed_a": SuiteTask("sim_arm_reach_proprio.yaml"),
    "reach_fixed_b": SuiteTask("sim_arm_reach_proprio.yaml", ("arm_reach.target_low=[0.45, -0.12, 0.2]",
                                                              "arm_reach.target_high=[0.45, -0.12, 0.2]")),
}

Expert = Callable[[dict[str, np.ndarray]], Any]  # an observation -> the environment's action


def cartpole_expert(obs: dict[str, np.ndarray]) -> int:
    """Push toward where the pole falls: the sign of a linear feedback on (x, x', theta, theta') (holds the
    pole for all 500 steps from Gymnasium's start states)."""
    x, x_dot, theta, theta_dot = np.asarray(obs["vector"], np.float64)
    return int(0.1 * x + 0.5 * x_dot + 10.0 * theta + 2.0 * theta_dot > 0)


GYM_EXPERTS: dict[str, Expert] = {"CartPole-v1": cartpole_expert}


def make_expert(cfg: Config, env: Env) -> Expert:
    """The scripted controller of the config's task (ValueError naming the task when there is none)."""
    if cfg.backend == "gym":
        if cfg.gym_id not in GYM_EXPERTS:
            raise ValueError(f"{cfg.name}: no scripted expert for Gymnasium env {cfg.gym_id!r} (known: "
                             f"{sorted(GYM_EXPERTS)})")
        return GYM_EXPERTS[cfg.gym_id]
    from sim.tasks import make_policy

    return make_policy("scripted", env.env.unwrapped.robot)


def model_action(env: Env, action: Any) -> np.ndarray:
    """An environment action as the model sees it: one-hot when discrete, else mapped onto [-1, 1]."""
    act = env.act_space
    if act.discrete:
        return np.eye(act.dim, dtype=np.float32)[int(action)]
    low, high = np.asarray(env._act.low, np.float64), np.asarray(env._act.high, np.float64)
    scaled = 2.0 * (np.asarray(action, np.float64) - low) / (high - low) - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def run_episode(env: Env, choose: Callable[[dict[str, np.ndarray]], np.ndarray],
                record: Callable[[dict[str, Any]], None] | None = None) -> tuple[float, bool | None]:
    """One episode acting with `choose` (observation -> model-form action): its return and success."""
    obs, total = env.reset(), 0.0
    while True:
        action = choose(obs)
        if record is not None:
            record({**obs, "action": action})
        total += float(obs["reward"])
        if obs["is_last"]:
            success = env.info.get("success")
            return total, None if success is None else bool(success)
        obs = env.step(action)


def record(cfg: Config, out: str | Path, episodes: int, random_episodes: int = 5,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Record `episodes` expert episodes of `cfg`'s task into `out` (a task directory) and measure the random
    policy; returns the task.json it writes. An existing task directory is refused: a replay directory
    holds one recording."""
    out = Path(out)
    if (out / TASK_FILE).exists() or (out / REPLAY_DIR).exists():
        raise ValueError(f"{out}: already holds a recording ({TASK_FILE} or {REPLAY_DIR}/); give a new directory")
    name = out.name or cfg.name
    env = Env(cfg, seed=cfg.seed)
    try:
        expert = make_expert(cfg, env)
        returns, successes = [], []
        with Replay(out / REPLAY_DIR, chunk_length=cfg.replay.chunk_length) as replay:
            for i in range(episodes):
                ret, ok = run_episode(env, lambda obs: model_action(env, expert(obs)),
                                      lambda step: replay.add(step, name, task=name))
                returns.append(ret)
                successes.append(ok)
                if progress:
                    progress(f"{name}: expert episode {i + 1}/{episodes} return {ret:.3f}")
        rng = np.random.default_rng(cfg.seed)
        random_env = Env(cfg, seed=cfg.seed + RANDOM_SEED_OFFSET)
        try:
            random = [run_episode(random_env, lambda obs: random_env.random_action(rng))[0]
                      for _ in range(random_episodes)]
        finally:
            random_env.close()
    finally:
        env.close()
    write_resolved(cfg, out)
    info = {
        "format": TASK_FORMAT, "name": name, "config": RESOLVED_NAME, "act_space": env.act_space.to_dict(),
        "episodes": episodes,
        "expert_return": float(np.mean(returns)), "expert_returns": returns,
        "expert_success": None if None in successes else float(np.mean(successes)),
        "random_return": float(np.mean(random)) if random else None, "random_returns": random,
    }
    atomic_write_bytes(out / TASK_FILE, json.dumps(info, indent=1).encode(), prefix=".task.")
    return info
