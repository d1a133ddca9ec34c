"""Robot backends by config: `backend: sim` builds a simulated robot from the `sim` package.

`sim` depends on `robot` (it implements the robot interface), so `robot` cannot import it at
module level; it is looked up by name when a config asks for it, like a plugin. Hardware
backends live in `robot/` itself and are listed here the same way (imported only when used, so a
simulated robot never needs pyserial).
"""

from __future__ import annotations

import importlib

from core.config import Config
from core.interface import ArraySpec, DiscreteSpec, Robot

BACKENDS = {"sim": ("sim.tasks", "make_robot"), "servo": ("robot.servo.robot", "make_robot")}


class BackendError(RuntimeError):
    """A config names a backend this robot process cannot build."""


def make_backend(cfg: Config) -> Robot:
    """The robot backend that `cfg.backend` names."""
    if cfg.backend not in BACKENDS:
        raise BackendError(f"config {cfg.name!r}: backend {cfg.backend!r} cannot drive a robot process "
                           f"(known: {sorted(BACKENDS)}); gym environments train with reverie-learner train --env")
    module, name = BACKENDS[cfg.backend]
    try:
        factory = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise BackendError(f"backend {cfg.backend!r} needs the {module.split('.')[0]!r} package: {exc}") from None
    return factory(cfg)


def action_dim(spec: ArraySpec | DiscreteSpec) -> tuple[int, bool]:
    """(model action width, discrete) of a robot's action spec."""
    if isinstance(spec, DiscreteSpec):
        return spec.n, True
    if len(spec.shape) != 1:
        raise BackendError(f"continuous actions must be a vector, the backend's spec has shape {spec.shape}")
    return spec.shape[0], False
