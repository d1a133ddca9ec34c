"""Leader-arm teleoperation, the usual low-cost setup (SO-101, Koch): a person moves a leader arm whose servos,
on a bus of their own, have torque off; the follower copies the leader's joint angles.

`LeaderArm` reads the leader (its config is a robot config whose `motors` block is the leader's bus, e.g.
`hardware_configs/so101_leader.yaml`; its calibration maps ticks to the same joint angles as the follower's).
`LeaderControl` turns those angles into the follower's action, in the model form a policy would output, so
the control loop records it like any action and sends it through the follower's own mapping and safety layer
(limits, the per-step cap, the watchdog): a leader moved faster than `safety.max_step` per tick is followed
at that rate, and a leader beyond the follower's limits is followed to the limit.

`reverie-robot run --leader LEADER_CONFIG` drives the follower this way and streams the demonstrations to a
learner; `reverie-replay record --source leader` starts that process against its own link and stores them
in a replay directory (docs/offline.md).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from core.config import Config
from core.interface import RobotError
from robot.servo.bus import MotorBus
from robot.servo.calibration import Calibration, default_path
from robot.servo.errors import MotorError
from robot.servo.robot import ServoRobot

log = logging.getLogger("reverie.teleop")


class LeaderArm:
    """The leader's servos, torque off, read once a control tick; angles in the follower's joint order."""

    def __init__(self, cfg: Config, joints: list[str]) -> None:
        if cfg.motors is None:
            raise RobotError(f"leader config {cfg.name!r}: needs a motors block (the leader arm's bus)")
        m = cfg.motors
        self.cfg, self.names = cfg, [s.name for s in m.servos]
        missing = [j for j in joints if j not in self.names]
        if missing:
            raise RobotError(f"leader config {cfg.name!r}: no servo for the follower's joint(s) {missing} (its servos: "
                             f"{self.names}); a leader joint carries the name of the follower joint it moves")
        self.joints = list(joints)
        self.ids = [s.id for s in m.servos]
        path = default_path(cfg)
        if Path(path).is_file():
            self.calibration = Calibration.load(path, m.servos)
        else:
            log.warning("leader %s: no calibration file at %s; using raw ticks around 2048 as angle 0 "
                        "(reverie-robot calibrate --config <the leader's config>)", cfg.name, path)
            self.calibration = Calibration.default(m.servos)
        margin = None if m.timeout_margin_ms is None else m.timeout_margin_ms / 1000
        self.bus = MotorBus(m.port, m.protocol, m.baud, models={s.id: s.model for s in m.servos}, retries=m.retries,
                            timeout_margin_s=margin)
        self.bus.open()
        try:
            for servo in m.servos:
                if self.bus.ping(servo.id) is None and self.bus.ping(servo.id) is None:
                    raise RobotError(f"leader {m.port}: servo {servo.id} ({servo.name}) does not answer; check its "
                                     f"power, cable and id (reverie-robot scan --port {m.port})")
            self.bus.sync_write("Torque_Enable", dict.fromkeys(self.ids, 0))  # a person moves it: never stiff
        except BaseException:
            self.bus.close()
            raise
        self.last: np.ndarray | None = None

    def read(self) -> np.ndarray:
        """The leader's joint angles (rad), in the follower's joint order; the last reading if a read fails."""
        try:
            values = self.bus.sync_read(["Present_Position"], self.ids)["Present_Position"]
        except MotorError as exc:
            if self.last is None:
                raise RobotError(f"leader {self.cfg.motors.port}: cannot read the leader arm ({exc})") from None
            log.warning("leader: read failed (%s); holding its last reading", exc)
            return self.last
        angles = self.calibration.to_radians(self.names, np.array([values[i] for i in self.ids]))
        self.last = angles[[self.names.index(j) for j in self.joints]]
        return self.last

    def close(self) -> None:
        with contextlib.suppress(MotorError):  # it is off already; this only makes sure
            self.bus.sync_write("Torque_Enable", dict.fromkeys(self.ids, 0))
        self.bus.close()

    def __enter__(self) -> LeaderArm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaderControl:
    """The follower's action (model form, in [-1, 1]) that puts each goal at the leader's angle: absolute mode
    maps the angle within the follower's limits; delta mode asks for the step from the follower's present goal."""

    def __init__(self, leader: LeaderArm, follower: ServoRobot) -> None:
        self.leader, self.follower = leader, follower
        self.mode = follower.cfg.motors.action_mode
        self.delta = follower.cfg.motors.joint_delta

    def __call__(self, _obs: dict[str, np.ndarray]) -> np.ndarray:
        target = self.leader.read()
        f = self.follower
        if self.mode == "absolute":
            action = 2.0 * (target - f.lower) / (f.upper - f.lower) - 1.0
        else:
            action = (target - f.goal) / self.delta
        return np.clip(action, -1.0, 1.0).astype(np.float32)
