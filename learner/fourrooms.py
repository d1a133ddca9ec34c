"""MiniGrid's FourRooms (the `minigrid` package, in the `learner` extra) as an env the learner trains on: CASCADE's
sparse navigation task (issue 26; `bench/exploration.py cascade --task fourrooms`). It lives in the package, not in
bench/, so that a run's config naming it resolves wherever Reverie is installed (`train`, `adapt`, `replay record`).

    gym.make("learner.fourrooms:ReverieFourRooms-v0")    # Gymnasium imports this module, which registers the id
    reverie-learner train --env gymnasium:learner.fourrooms:ReverieFourRooms-v0 --logdir runs/fr --set ...
    reverie-learner adapt --from runs/fr --logdir runs/fr-far --reward learner.fourrooms:goal_far

MiniGrid's own observation holds a Discrete direction and a mission string, which the learner does not take (it
trains on Box observations). Here the observation is one vector (55,): the agent's cell (x, y) / 18, its direction
one-hot (4) and the object types of its 7 x 7 egocentric view / 10 (49), i.e. what a MiniGrid agent sees plus
where it is, as a robot knows its pose; coverage is counted on the cell. Actions: turn left, turn right, forward
(FourRooms' other four change nothing there). Reward and episode: MiniGrid's (1 - 0.9 steps/100 on reaching the
green goal, 100 steps). The agent starts in the top-left room's corner, START, and the goal is the far corner,
GOAL (MiniGrid draws both per episode by default: random starts would give a random policy most of the coverage);
the four doorways and the start direction are drawn per episode from the reset seed.

Importing this module needs only Gymnasium; `minigrid` is imported when the env is made, and its absence is a
DependencyNotInstalled naming the extra (`learner.envs.Env` reports it as an EnvError).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENV_ID = "ReverieFourRooms-v0"
GYM_ID = f"learner.fourrooms:{ENV_ID}"  # what a config's gym_id names (the module registers it when imported)
SIZE = 19  # the grid, outer walls included; the inner walls are the lines x = 9 and y = 9
WALL = 9
ROOM_CELLS = 4 * 8 * 8  # the cells inside the four rooms (doorways on the inner walls not counted)
ACTIONS = 3  # MiniGrid's left, right, forward
START, GOAL = (1, 1), (SIZE - 2, SIZE - 2)
MISSING = ("FourRooms needs the `minigrid` package of Reverie's `learner` extra: pip install 'reverie[learner]' "
           "(from a checkout: pip install -e '.[learner]')")


class FourRooms(gym.Env):
    """FourRooms with a Box observation: cell, direction, egocentric view (see the module's docstring)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = None) -> None:
        try:
            from minigrid.envs import FourRoomsEnv
        except ImportError:
            raise gym.error.DependencyNotInstalled(MISSING) from None
        self.grid_env = FourRoomsEnv(agent_pos=START, goal_pos=GOAL, render_mode=render_mode)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0.0, 1.0, (2 + 4 + 49,), np.float32)
        self.action_space = spaces.Discrete(ACTIONS)

    def _vector(self, obs: dict[str, Any]) -> np.ndarray:
        x, y = self.grid_env.agent_pos
        direction = np.zeros(4, np.float32)
        direction[int(obs["direction"])] = 1.0
        view = np.asarray(obs["image"])[..., 0].astype(np.float32).reshape(-1) / 10.0
        return np.concatenate([np.array([x, y], np.float32) / (SIZE - 1), direction, view])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, info = self.grid_env.reset(seed=seed, options=options)
        return self._vector(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.grid_env.step(int(action))
        return self._vector(obs), float(reward), terminated, truncated, info

    def render(self) -> Any:
        return self.grid_env.render()

    def close(self) -> None:
        self.grid_env.close()


def cells(vector: np.ndarray) -> np.ndarray:
    """The grid cells (N, 2) of observations (N, 55) (or any (..., 55): flattened)."""
    v = np.asarray(vector).reshape(-1, np.shape(vector)[-1])
    return np.rint(v[:, :2] * (SIZE - 1)).astype(int)


def room_coverage(vector: np.ndarray) -> float:
    """The share of the rooms' 256 cells that observations visited (doorways and walls not counted)."""
    c = cells(vector)
    inside = (c > 0).all(1) & (c < SIZE - 1).all(1) & (c != WALL).all(1)
    return len({(int(x), int(y)) for x, y in c[inside]}) / ROOM_CELLS


def at_cell(vector: np.ndarray, x: int, y: int) -> np.ndarray:
    """1 where the agent is at cell (x, y), else 0, shaped as the observations' leading axes."""
    v = np.asarray(vector)
    c = cells(v).reshape(*v.shape[:-1], 2)
    return ((c[..., 0] == x) & (c[..., 1] == y)).astype(np.float32)


def goal_far(batch: Any) -> np.ndarray:
    """A goal chosen after collection (`adapt --reward learner.fourrooms:goal_far`): 1 per step at the far corner."""
    return at_cell(batch["vector"], *GOAL)


def goal_top_right(batch: Any) -> np.ndarray:
    """Another: 1 per step in the top-right room's far corner."""
    return at_cell(batch["vector"], SIZE - 2, 1)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=FourRooms, max_episode_steps=None)
