"""An emulated servo bus built from a hardware config: the config's servos on a pseudo-terminal,
with PyBullet physics (`sim.servo_plant`) behind them when `emulator.model` names a robot.

Each emulated servo's raw zero is 2048 plus a seeded offset within +-`emulator.offset_spread`, as if
the horns were mounted a little off; `true_calibration` gives the calibration that undoes exactly
those offsets, so the robot side can run without the interactive `reverie-robot calibrate` step.
"""

from __future__ import annotations

import math

import numpy as np

from learner.config import Config
from learner.config_hardware import MotorsConfig
from robot.motors.calibration import Calibration, JointCalibration
from robot.motors.emulator import EmulatedServo, Plant, ServoEmulator
from robot.motors.tables import MODELS
from sim.servo_plant import PlantError, PyBulletPlant

MID_TICKS = 2048


def _motors(cfg: Config) -> MotorsConfig:
    if cfg.motors is None:
        raise PlantError("motors: the config has no motors block, so there are no servos to emulate")
    return cfg.motors


def emulated_servos(cfg: Config) -> list[EmulatedServo]:
    """One emulated servo per `motors.servos` entry: its id, model and the bus baud; zero ticks offset
    by a seeded random amount within +-`emulator.offset_spread`; direction +1."""
    motors = _motors(cfg)
    spread = cfg.emulator.offset_spread
    offsets = np.random.default_rng(cfg.seed).integers(-spread, spread + 1, size=len(motors.servos))
    return [
        EmulatedServo(id=s.id, model=s.model, baud=motors.baud, zero_ticks=MID_TICKS + int(off), direction=1)
        for s, off in zip(motors.servos, offsets)
    ]


def true_calibration(cfg: Config) -> Calibration:
    """The calibration of the emulated servos of `cfg`: their zero ticks and direction, and the
    config's [lower, upper] as the recorded range. `.save(path)` writes the calibration file."""
    joints, per_rev = {}, {}
    for servo, emulated in zip(_motors(cfg).servos, emulated_servos(cfg)):
        n = int(MODELS[servo.model].ticks_per_rev)
        scale = emulated.direction * n / (2 * math.pi)
        ends = sorted(round(emulated.zero_ticks + scale * angle) for angle in (servo.lower, servo.upper))
        joints[servo.name] = JointCalibration(servo.id, emulated.zero_ticks, emulated.direction, ends[0], ends[1])
        per_rev[servo.name] = n
    return Calibration(joints, per_rev)


class PhysicsEmulator(ServoEmulator):
    """A servo emulator that owns its plant: closing the emulator closes the plant too."""

    def __init__(self, protocol: str, servos: list[EmulatedServo], owned_plant: PyBulletPlant, timing: bool = True,
                 seed: int = 0) -> None:
        self.owned_plant = owned_plant
        super().__init__(protocol, servos, plant=owned_plant, timing=timing, seed=seed)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.owned_plant.close()


def emulate(cfg: Config, plant: Plant | None = None, timing: bool = True) -> ServoEmulator:
    """An emulated bus for `cfg` (not started: `.start()` or `with`). Without a `plant` it builds the
    PyBullet model `emulator.model` (and closes it with the emulator); with neither, servos are kinematic."""
    motors = _motors(cfg)
    servos = emulated_servos(cfg)
    if plant is not None or cfg.emulator.model is None:
        return ServoEmulator(motors.protocol, servos, plant=plant, timing=timing, seed=cfg.seed)
    physics = PyBulletPlant(cfg)
    try:
        return PhysicsEmulator(motors.protocol, servos, physics, timing=timing, seed=cfg.seed)
    except BaseException:
        physics.close()
        raise
