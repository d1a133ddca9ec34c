"""The interface every robot backend implements: simulated robots, servo arms, quadrupeds.

A backend is a context manager that owns hardware (or a simulator) and offers five things:
`reset` to move to a home/reset pose and begin an episode, `send` to command one action,
`observe` to read sensors into a dict, `stop` to bring the motors to a safe state, and `close`.

Holding a fixed control rate is the caller's job: `send` does not wait for the control period
on hardware. A simulator has no wall clock, so its `send` advances physics by one period.

Observations carry, besides sensor arrays, the four entries learning needs: `reward` (float32),
`is_first`, `is_last` and `is_terminal` (bool). `is_last` without `is_terminal` means the episode
was cut (time limit, abandoned); `is_terminal` means the task itself ended (no bootstrapping).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ArraySpec:
    """Shape, dtype, unit and bounds of one observation entry or of a continuous action."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    low: float | np.ndarray = -np.inf
    high: float | np.ndarray = np.inf
    unit: str = ""
    names: tuple[str, ...] = ()  # one name per element of a vector (joint names, axes)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.names and (len(self.shape) != 1 or len(self.names) != self.shape[0]):
            raise ValueError(f"{len(self.names)} names given for an array of shape {self.shape}")

    def contains(self, value: np.ndarray, atol: float = 0.0) -> bool:
        value = np.asarray(value)
        if value.shape != self.shape or value.dtype != self.dtype:
            return False
        return bool(np.all(value >= np.asarray(self.low) - atol) and np.all(value <= np.asarray(self.high) + atol))


@dataclass(frozen=True)
class DiscreteSpec:
    """A choice among `n` actions, each with a name (for example 'move +x', 'toggle gripper')."""

    n: int
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n < 1 or (self.names and len(self.names) != self.n):
            raise ValueError(f"discrete spec with n={self.n} and {len(self.names)} names")

    def contains(self, value: Any) -> bool:
        return np.ndim(value) == 0 and 0 <= int(value) < self.n and int(value) == value


ActionSpec = ArraySpec | DiscreteSpec


def flag_specs() -> dict[str, ArraySpec]:
    """Specs of the episode entries every backend's observation includes."""
    return {
        "reward": ArraySpec((), np.float32, description="reward for the transition into this observation"),
        "is_first": ArraySpec((), np.bool_, 0, 1, description="first observation of an episode"),
        "is_last": ArraySpec((), np.bool_, 0, 1, description="last observation of an episode"),
        "is_terminal": ArraySpec((), np.bool_, 0, 1, description="the task ended here (no bootstrap)"),
    }


class RobotError(RuntimeError):
    """A backend could not do what was asked; the message names the part (joint, servo, sensor)."""


class Robot(abc.ABC):
    """A robot backend. Subclasses fill `observation_spec` and `action_spec` in `__init__`."""

    observation_spec: Mapping[str, ArraySpec]
    action_spec: ActionSpec

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Move to the home/reset pose, begin an episode and return its first observation."""

    @abc.abstractmethod
    def send(self, action: np.ndarray | int) -> None:
        """Command one action. Out-of-range continuous actions are clipped to the spec."""

    @abc.abstractmethod
    def observe(self) -> dict[str, np.ndarray]:
        """Read sensors into a dict matching `observation_spec` (flags included)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Bring the motors to a safe state (hold still or torque off). Safe to call repeatedly."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop and release every resource. Safe to call repeatedly."""

    def __enter__(self) -> Robot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
