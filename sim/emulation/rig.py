"""An emulated servo bus built from a hardware config: the config's servos on a pseudo-terminal,
with PyBullet physics (`sim.emulation.servo_plant`) behind them when `emulator.model` names a robot.

Each emulated servo's raw zero is 2048 plus a seeded offset within +-`emulator.offset_spread`, as if
the horns were mounted a little off; `true_calibration` gives the calibration that undoes exactly
those offsets, so the robot side can run without the interactive `reverie-robot calibrate` step.

`EmulatedRig` adds the other sensors of a real-robot task on the same PyBullet world: a camera streaming the
scene with its ArUco markers and cube, and a BNO055 IMU.
"""

from __future__ import annotations

import logging
import math
import time
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from core.config import Config
from core.config.hardware import MotorsConfig
from robot.emulated.servo_bus import EmulatedServo, Plant, ServoEmulator
from robot.servo.calibration import Calibration, JointCalibration
from robot.servo.tables import MODELS
from sim.emulation.servo_plant import PlantError, PyBulletPlant

if TYPE_CHECKING:  # the camera and IMU modules load only for a rig that has them
    from robot.emulated.imu import EmulatedBNO055
    from sim.emulation.camera_server import MjpegServer
    from sim.emulation.scene_render import SceneRenderer

log = logging.getLogger(__name__)

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
    config's [lower, upper] as the recorded range, marked emulated. `.save(path)` writes the calibration file."""
    joints, per_rev = {}, {}
    for servo, emulated in zip(_motors(cfg).servos, emulated_servos(cfg)):
        n = int(MODELS[servo.model].ticks_per_rev)
        scale = emulated.direction * n / (2 * math.pi)
        ends = sorted(round(emulated.zero_ticks + scale * angle) for angle in (servo.lower, servo.upper))
        joints[servo.name] = JointCalibration(servo.id, emulated.zero_ticks, emulated.direction, ends[0], ends[1])
        per_rev[servo.name] = n
    return Calibration(joints, per_rev, emulated=True)  # a real robot refuses it


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


EMULATED_MAX_AGE_MS = 1000
SLOW_CLOSE_S = 2.0


class EmulatedRig:
    """Everything `reverie-sim emulate` stands in for, from one config: the servo bus on a pseudo-terminal,
    and on the same PyBullet world the fixed camera (`emulator.camera`: `sim.emulation.scene_render` served as MJPEG
    over HTTP by `sim.emulation.camera_server`) and a BNO055 on the robot's base (`emulator.imu`, its own pty).

    A context manager; `overrides()` are the `--set` values that point the robot's config at all of it.
    """

    def __init__(self, cfg: Config, timing: bool = True, host: str = "127.0.0.1") -> None:
        em = cfg.emulator
        wanted = [key for key, on in (("emulator.camera", em.camera is not None), ("emulator.imu", em.imu)) if on]
        if wanted and em.model is None:
            raise PlantError(f"{' and '.join(wanted)}: need the PyBullet world of emulator.model, which is null; "
                             "name the model (so101, koch or quadruped12) or drop them")
        self.cfg, self.timing, self.host = cfg, timing, host
        self.bus: ServoEmulator | None = None
        self.scene: SceneRenderer | None = None
        self.server: MjpegServer | None = None
        self.imu: EmulatedBNO055 | None = None

    def start(self) -> EmulatedRig:
        from robot.emulated.imu import EmulatedBNO055
        from sim.emulation.camera_server import MjpegServer
        from sim.emulation.imu_plant import pybullet_imu_source
        from sim.emulation.scene_render import SceneRenderer

        try:
            self.bus = emulate(self.cfg, timing=self.timing).start()
            cam = self.cfg.emulator.camera
            if cam is not None:
                self.scene = SceneRenderer(self.plant, self.cfg, supersample=cam.supersample)
                self.server = MjpegServer(self.scene.render, cam.fps, host=self.host).start()
            if self.cfg.emulator.imu:
                self.imu = EmulatedBNO055(pybullet_imu_source(self.plant), seed=self.cfg.seed).start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def plant(self) -> PyBulletPlant:
        """The PyBullet world behind the servos (tests drive it directly)."""
        if not isinstance(self.bus, PhysicsEmulator):
            raise PlantError("emulator.model: null, so this rig has no PyBullet world (the servos are kinematic)")
        return self.bus.owned_plant

    @property
    def port(self) -> str:
        """The servo bus's pseudo-terminal (`motors.port`)."""
        if self.bus is None:
            raise RuntimeError("EmulatedRig: not started")
        return self.bus.port

    @property
    def camera_url(self) -> str | None:
        """The MJPEG stream (`sensors.camera.device`), or None without `emulator.camera`."""
        return self.server.url if self.server is not None else None

    @property
    def imu_port(self) -> str | None:
        """The BNO055's pseudo-terminal (`sensors.imu.port`), or None without `emulator.imu`."""
        return self.imu.port if self.imu is not None else None

    def overrides(self) -> list[str]:
        """`--set` values that point the robot's config at this rig's bus, camera and IMU."""
        sets = [f"motors.port={self.port}"]
        if self.camera_url is not None:
            # A rendered stream on a machine that also runs physics (and often the learner) delivers frames
            # later than a webcam does: allow them a second before calling them stale.
            sets += [f"sensors.camera.device={self.camera_url}", f"sensors.camera.max_age_ms={EMULATED_MAX_AGE_MS}"]
        if self.imu_port is not None:
            sets.append(f"sensors.imu.port={self.imu_port}")
        return sets

    def close(self) -> None:
        """Stop everything, the IMU and camera before the bus that owns the plant they read. Safe to repeat."""
        for part in ("imu", "server", "scene", "bus"):
            device = getattr(self, part)
            setattr(self, part, None)
            if device is not None:
                started = time.monotonic()
                try:
                    device.close()
                except Exception:
                    log.exception("EmulatedRig: closing the %s failed", part)
                took = time.monotonic() - started
                if took > SLOW_CLOSE_S:  # a shutdown that drags says where
                    log.warning("EmulatedRig: closing the %s took %.1f s", part, took)

    def __enter__(self) -> EmulatedRig:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
