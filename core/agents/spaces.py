"""What an agent is built for: the observation space of a step and the action as a model sees it.

Every algorithm, its policy blob and the robot's check of received weights use these two, so they sit
beside the agent interface rather than inside one algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.layout import StepLayout

ObsSpace = StepLayout  # a step's layout less its action: the observation entries and the episode flags


@dataclass(frozen=True)
class ActSpace:
    """Actions as the model sees them: a float vector (one-hot when discrete)."""

    dim: int
    discrete: bool

    def to_dict(self) -> dict:
        return {"dim": self.dim, "discrete": self.discrete}

    def random(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random action in model form (prefill, and robots before their first weights)."""
        if self.discrete:
            return np.eye(self.dim, dtype=np.float32)[rng.integers(self.dim)]
        return rng.uniform(-1.0, 1.0, self.dim).astype(np.float32)

    def to_env(
        self, action: np.ndarray, low: np.ndarray | None = None, high: np.ndarray | None = None
    ) -> np.ndarray | int:
        """Model-form action -> the environment's: an index when discrete, else [-1, 1] mapped onto [low, high]."""
        action = np.asarray(action, dtype=np.float32)
        if self.discrete:
            return int(action.argmax())
        action = np.clip(action, -1.0, 1.0)
        if low is None or high is None:
            return action
        return np.asarray(low + (action + 1.0) * 0.5 * (np.asarray(high) - low), dtype=np.float32)
