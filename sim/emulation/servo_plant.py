"""PyBullet physics behind the emulated servo bus: the `Plant` of `robot.emulated.servo_bus`.

Each servo of `cfg.motors.servos` drives the URDF joint of the same name in the model
`cfg.emulator.model` (see `sim.emulation.servo_models`). A servo with torque on is a position motor whose
force is capped at its model's stall torque times the torque-limit fraction and whose speed is
capped at the model's no-load speed; with torque off its joint is free apart from a little viscous
damping (the gearbox), so gravity moves it. The reported load is the motor torque over the stall torque.

Physics runs in real time in its own thread: step k happens no earlier than k / physics_hz seconds
after the start. When the thread falls behind (a busy machine) it drops the missed steps instead of
bursting to catch up, so simulated time may lag wall time but never runs ahead of it.

Only the physics thread steps the world; every pybullet call holds `self._lock`, and the emulator's
thread reads the joint state cached after each step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import pybullet as p

from core.config import Config
from sim.assets import asset
from sim.emulation.servo_models import servo_model, urdf_path

FREE_DAMPING = 0.02  # viscous damping of a joint whose servo has torque off, N·m·s/rad
POSITION_GAIN = 0.2  # pybullet position-motor gain (fraction of the error corrected per step)
LOCKED_FORCE = 50.0  # joints of the URDF that no servo drives are held rigidly with this force, N·m
GROUND_GAP = 0.002  # a floating base is placed with its lowest point this far above the floor, m


@dataclass(frozen=True)
class ServoSpec:
    stall_torque: float  # N·m at the nominal supply voltage
    speed: float  # no-load speed, rad/s


# From the makers' datasheets (nominal voltage): XL330 5 V, XL430/XM430 12 V, STS3215 12 V.
SERVO_SPECS: dict[str, ServoSpec] = {
    "xl330-m077": ServoSpec(0.215, 40.0),
    "xl330-m288": ServoSpec(0.52, 10.8),
    "xl430-w250": ServoSpec(1.5, 6.0),
    "xm430-w350": ServoSpec(4.1, 4.8),
    "sts3215": ServoSpec(2.9, 4.7),
}


class PlantError(RuntimeError):
    """The config and the PyBullet model do not fit together; the message names the key and joint."""


class PyBulletPlant:
    """Real-time PyBullet physics of the robot `cfg.emulator.model`, one joint per configured servo."""

    def __init__(self, cfg: Config, gui: bool = False) -> None:
        if cfg.motors is None:
            raise PlantError("motors: the config has no motors block, so there are no servos to emulate")
        if cfg.emulator.model is None:
            raise PlantError("emulator.model: null; name the PyBullet model the servos drive (so101, koch or "
                             "quadruped12)")
        self.model = servo_model(cfg.emulator.model)
        self.names = [s.name for s in cfg.motors.servos]
        self.specs = [SERVO_SPECS[s.model] for s in cfg.motors.servos]
        self.dt = 1.0 / cfg.emulator.physics_hz
        n = len(self.names)
        self._goal = np.array([s.home for s in cfg.motors.servos], dtype=np.float64)
        self._torque = np.zeros(n, dtype=bool)  # servos power up with torque off
        self._limit = np.ones(n)
        self._dirty = np.ones(n, dtype=bool)  # motor settings not yet given to pybullet
        self._pos = np.zeros(n)
        self._vel = np.zeros(n)
        self._load = np.zeros(n)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.steps = 0  # physics steps taken
        self.skipped = 0  # steps dropped because the thread was late
        self.client = p.connect(p.GUI if gui else p.DIRECT)
        try:
            self._build(cfg)
            self._reset_locked(self._goal)
        except BaseException:
            p.disconnect(self.client)
            raise
        self._thread = threading.Thread(target=self._run, name=f"plant-{self.model.name}", daemon=True)
        self._thread.start()

    # ----- setup --------------------------------------------------------------------------------
    def _build(self, cfg: Config) -> None:
        c = self.client
        p.setTimeStep(self.dt, physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)
        self.floor = p.loadURDF(asset("plane.urdf"), physicsClientId=c)
        self.body = p.loadURDF(urdf_path(self.model.name), useFixedBase=self.model.fixed_base, physicsClientId=c)
        by_name = {}
        for j in range(p.getNumJoints(self.body, physicsClientId=c)):
            by_name[p.getJointInfo(self.body, j, physicsClientId=c)[1].decode()] = j
        self.joints = [self._joint_index(by_name, i, name) for i, name in enumerate(self.names)]
        for j in sorted(set(by_name.values()) - set(self.joints)):
            p.setJointMotorControl2(self.body, j, p.POSITION_CONTROL, targetPosition=0.0, force=LOCKED_FORCE,
                                    physicsClientId=c)

    def _joint_index(self, by_name: dict[str, int], i: int, name: str) -> int:
        if name not in by_name:
            raise PlantError(
                f"motors.servos.{i}.name: joint {name!r} is not in the PyBullet model {self.model.name!r} "
                f"(emulator.model); its joints are {sorted(by_name)}"
            )
        return by_name[name]

    # ----- the Plant protocol -----------------------------------------------------------------
    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Joint angles (rad), velocities (rad/s) and load (motor torque / stall torque, [-1, 1])."""
        with self._lock:
            return self._pos.copy(), self._vel.copy(), self._load.copy()

    def set_goal(self, index: int, angle: float) -> None:
        with self._lock:
            self._goal[index] = float(angle)
            self._dirty[index] = True

    def set_torque(self, index: int, on: bool) -> None:
        with self._lock:
            self._torque[index] = bool(on)
            self._dirty[index] = True

    def set_torque_limit(self, index: int, fraction: float) -> None:
        with self._lock:
            self._limit[index] = float(np.clip(fraction, 0.0, 1.0))
            self._dirty[index] = True

    # ----- tests and tools ----------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[int]:
        """Hold the physics lock and get the pybullet client: other code adding bodies to the world or
        reading poses (`sim.emulation.scene_render`) must never call pybullet while the physics thread steps."""
        with self._lock:
            if self._stop.is_set():
                raise PlantError(f"the {self.model.name} plant is closed: its pybullet world is gone")
            yield self.client

    @property
    def sim_time(self) -> float:
        """Simulated seconds since the start (steps taken times the physics period)."""
        return self.steps * self.dt

    def reset_pose(self, angles: Sequence[float] | Mapping[str, float]) -> None:
        """Teleport the joints to `angles` (per servo index, or by joint name; others keep theirs) at rest,
        with goals equal to them; a floating base is set upright on the floor."""
        with self._lock:
            target = self._pos.copy()
            if isinstance(angles, Mapping):
                unknown = sorted(set(angles) - set(self.names))
                if unknown:
                    raise PlantError(f"reset_pose: no servo drives joint(s) {unknown}; joints are {self.names}")
                for name, angle in angles.items():
                    target[self.names.index(name)] = angle
            else:
                if len(angles) != len(self.names):
                    raise PlantError(f"reset_pose: {len(angles)} angles given for {len(self.names)} servos")
                target[:] = angles
            self._reset_locked(target)

    def link_position(self, link: int = -1) -> np.ndarray:
        """World position of a link of the robot (-1: its base), m."""
        with self._lock:
            if link < 0:
                return np.array(p.getBasePositionAndOrientation(self.body, physicsClientId=self.client)[0])
            return np.array(p.getLinkState(self.body, link, physicsClientId=self.client)[4])

    def base_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The base's world position (m), orientation (quaternion x, y, z, w) and angular velocity (rad/s)."""
        with self._lock:
            pos, quat = p.getBasePositionAndOrientation(self.body, physicsClientId=self.client)
            omega = p.getBaseVelocity(self.body, physicsClientId=self.client)[1]
        return np.array(pos), np.array(quat), np.array(omega)

    def set_base(self, position: Sequence[float], quaternion_xyzw: Sequence[float],
                 angular_velocity: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """Put the base somewhere (tests: tilt the robot, throw it in the air)."""
        with self._lock:
            p.resetBasePositionAndOrientation(self.body, list(position), list(quaternion_xyzw),
                                              physicsClientId=self.client)
            p.resetBaseVelocity(self.body, (0, 0, 0), list(angular_velocity), physicsClientId=self.client)

    def base_up(self) -> float:
        """z component of the base's up axis: 1 upright, 0 on its side, -1 upside down."""
        with self._lock:
            quat = p.getBasePositionAndOrientation(self.body, physicsClientId=self.client)[1]
        return float(np.asarray(p.getMatrixFromQuaternion(quat)).reshape(3, 3)[2, 2])

    # ----- physics ------------------------------------------------------------------------------
    def _reset_locked(self, angles: np.ndarray) -> None:
        c = self.client
        for joint, angle in zip(self.joints, angles):
            p.resetJointState(self.body, joint, float(angle), 0.0, physicsClientId=c)
        self._goal[:] = angles
        self._dirty[:] = True
        if not self.model.fixed_base:
            self._place_on_floor()
        self._read_state()

    def _place_on_floor(self) -> None:
        c = self.client
        p.resetBasePositionAndOrientation(self.body, (0, 0, 1.0), (0, 0, 0, 1), physicsClientId=c)
        p.resetBaseVelocity(self.body, (0, 0, 0), (0, 0, 0), physicsClientId=c)
        links = range(-1, p.getNumJoints(self.body, physicsClientId=c))
        lowest = min(p.getAABB(self.body, link, physicsClientId=c)[0][2] for link in links)
        p.resetBasePositionAndOrientation(self.body, (0, 0, 1.0 - lowest + GROUND_GAP), (0, 0, 0, 1),
                                          physicsClientId=c)

    def _apply_motors(self) -> None:
        """Give pybullet the motor settings that changed since the last step."""
        c = self.client
        for i in np.flatnonzero(self._dirty):
            spec, joint = self.specs[i], self.joints[i]
            if self._torque[i]:
                p.setJointMotorControl2(
                    self.body, joint, p.POSITION_CONTROL, targetPosition=float(self._goal[i]),
                    force=spec.stall_torque * float(self._limit[i]), maxVelocity=spec.speed,
                    positionGain=POSITION_GAIN, velocityGain=1.0, physicsClientId=c,
                )
            else:  # motor off: a velocity motor with zero force exerts nothing
                p.setJointMotorControl2(self.body, joint, p.VELOCITY_CONTROL, targetVelocity=0.0, force=0.0,
                                        physicsClientId=c)
        self._dirty[:] = False
        free = np.flatnonzero(~self._torque)
        if len(free):
            p.setJointMotorControlArray(self.body, [self.joints[i] for i in free], p.TORQUE_CONTROL,
                                        forces=(-FREE_DAMPING * self._vel[free]).tolist(), physicsClientId=c)

    def _read_state(self) -> None:
        states = p.getJointStates(self.body, self.joints, physicsClientId=self.client)
        self._pos[:] = [s[0] for s in states]
        self._vel[:] = [s[1] for s in states]
        stall = np.array([spec.stall_torque for spec in self.specs])
        torque = np.array([s[3] for s in states])
        self._load[:] = np.where(self._torque, np.clip(torque / stall, -1.0, 1.0), 0.0)

    def _step(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._apply_motors()
            p.stepSimulation(physicsClientId=self.client)
            self._read_state()
            self.steps += 1

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            self._step()
            due += self.dt
            late = time.monotonic() - due
            if late > self.dt:  # more than a step behind: drop the missed steps rather than burst
                missed = int(late / self.dt)
                self.skipped += missed
                due += missed * self.dt

    # ----- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the physics thread and disconnect from pybullet. Safe to call repeatedly."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            if self.client is not None and p.isConnected(physicsClientId=self.client):
                p.disconnect(physicsClientId=self.client)

    def __enter__(self) -> PyBulletPlant:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
