"""A robot made of serial servos (an SO-101 or Koch arm, a servo quadruped) behind the safety layer.

One control tick is one sync read of positions (and velocities) and one sync write of goals. Every
goal passes the command filter (joint limits from config and calibration, a cap per step); a
watchdog puts the motors in a safe state when commands stop arriving; an e-stop cuts torque at any
time; every exit path ends with torque off. A safety event ends the episode (`is_last`) so the
learner sees the boundary; a fault that cannot be ridden out stops the robot with an error naming
the servo.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from core.config import Config
from core.interface import ArraySpec, Robot, RobotError, flag_specs
from robot.operator import OperatorPrompt
from robot.real_tasks import JointReach, Reading, gravity_in_body, make_task, upright
from robot.safety import CommandFilter, EStop, SafetyLog, Watchdog
from robot.sensors.rig import SensorFrame, Sensors
from robot.servo.bus import PTY_HINT, MotorBus, is_pseudo_terminal
from robot.servo.calibration import Calibration, default_path
from robot.servo.errors import MotorConfigError, MotorError, ServoFault
from robot.servo.tables import MODELS
from robot.servo.usb_latency import warn_if_slow

log = logging.getLogger("reverie.servo")

# Dynamixel: current-based position control (mode 5) lets Goal_Current cap the torque; mode 3 is plain position.
POSITION_MODE, CURRENT_POSITION_MODE = 3, 5
NO_CURRENT_CONTROL = ("xl430-w250",)  # no current sensing: its torque cannot be capped this way
RECENT_READS = 100  # control reads over which the reply loss is measured, for the message of a rate stop


def make_robot(cfg: Config) -> ServoRobot:
    return ServoRobot(cfg)


class ServoRobot(Robot):
    """`stdin`: the operator's terminal (default sys.stdin); `camera_source` replaces `sensors.camera.device`
    (a render callable or a cv2-like reader, for tests); `sensors=False` leaves camera and IMU closed (motion
    checks, which never observe)."""

    def __init__(self, cfg: Config, stdin: object | None = None, camera_source: object | None = None,
                 sensors: bool = True) -> None:
        if cfg.motors is None:
            raise RobotError(f"config {cfg.name!r}: backend servo needs a motors block")
        self.cfg = cfg
        m, s = cfg.motors, cfg.safety
        self.servos = list(m.servos)
        self.names = [sv.name for sv in self.servos]
        self.ids = [sv.id for sv in self.servos]
        self.calibration = self._load_calibration()
        self.lower, self.upper = self._limits()
        self.home = np.array([sv.home for sv in self.servos])
        # without sensors (motion checks) no task can be judged: the proprioceptive one stands in
        self.task = make_task(cfg, self.names, self.home) if sensors else JointReach(cfg, self.names, self.home)
        self.period = 1.0 / cfg.control.hz
        # the control step's read must fit here (retries included): by default one period, so the rate holds
        self.read_budget = m.read_budget_ms / 1000 if m.read_budget_ms is not None else self.period
        margin = None if m.timeout_margin_ms is None else m.timeout_margin_ms / 1000  # None: by the kind of port
        self.bus = MotorBus(m.port, m.protocol, m.baud, models={sv.id: sv.model for sv in self.servos},
                            retries=m.retries, timeout_margin_s=margin)
        self.filter = CommandFilter(self.lower, self.upper, s.max_step, self.names)
        self.events = SafetyLog()
        self.watchdog = Watchdog(s.watchdog_s, self._on_watchdog, name=f"{cfg.name}-watchdog")
        self.operator = OperatorPrompt.for_stdin(stdin) if s.estop_key else OperatorPrompt(interactive=False)
        self.estop = EStop(file=s.estop_file, key=s.estop_key, on_trigger=self._on_estop, stdin=stdin,
                           keys=self.operator.handle_key)
        wanted = sensors and (cfg.sensors.camera is not None or cfg.sensors.imu is not None)
        self.sensors = Sensors(cfg, camera_source) if wanted else None
        self.info: dict[str, object] = {}
        self._read_names = ["Present_Position"] + (["Present_Velocity"] if m.read_velocity else [])
        self._lock = threading.Lock()  # the watchdog and e-stop threads act on the bus too
        self._torque = False
        self._fault: str | None = None  # set once the robot must not move again (e-stop, servo fault)
        self._interrupted = False  # a safety event happened since the last observation: end the episode
        self._steps = 0
        self._closed = False
        self._bus_open = False
        self._watching = False
        self._goal = self.home.astype(np.float64)
        self._last: tuple[np.ndarray, np.ndarray | None] = (self._goal.copy(), None)  # the last positions read
        self._missed = 0  # control ticks in a row whose read did not complete within the period
        self._replies: deque[tuple[int, dict[int, int]]] = deque(maxlen=RECENT_READS)  # per control read
        self._late_since = 0  # the bus's late_bytes when the current run of missed ticks began
        self.observation_spec = self._observation_spec()
        self.action_spec = ArraySpec((len(self.names),), np.float32, -1.0, 1.0, self._action_unit(), tuple(self.names),
                                     f"joint goal {m.action_mode} per servo")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # --- set-up -------------------------------------------------------------------------------------------
    def _load_calibration(self) -> Calibration:
        path = default_path(self.cfg)
        if Path(path).is_file():
            calibration = Calibration.load(path, self.servos)
            port = self.cfg.motors.port
            if calibration.emulated and not is_pseudo_terminal(port):
                raise MotorConfigError(f"calibration file {path} was written by `reverie-sim emulate` for its emulated "
                                       f"servos, and {port} is not an emulated bus: calibrate this robot first "
                                       f"(reverie-robot calibrate --config ...), which replaces the file")
            return calibration
        log.warning("%s: no calibration file at %s; using raw ticks around 2048 as angle 0 "
                    "(run reverie-robot calibrate --config ... first on real hardware)", self.cfg.name, path)
        return Calibration.default(self.servos)

    def _limits(self) -> tuple[np.ndarray, np.ndarray]:
        """Config limits, narrowed to the range recorded at calibration (never beyond what a person moved)."""
        lower = np.array([sv.lower for sv in self.servos], dtype=np.float64)
        upper = np.array([sv.upper for sv in self.servos], dtype=np.float64)
        for i, name in enumerate(self.names):
            lo, hi = self.calibration.range_radians(name)
            lower[i], upper[i] = max(lower[i], lo), min(upper[i], hi)
            if lower[i] >= upper[i]:
                sv = self.servos[i]
                raise MotorConfigError(f"joint {name!r} (servo {sv.id}): configured range [{sv.lower}, {sv.upper}] "
                                       f"rad and calibrated range [{lo:.3f}, {hi:.3f}] rad do not overlap; "
                                       "recalibrate or fix the config")
        return lower, upper

    def _observation_spec(self) -> dict[str, ArraySpec]:
        names = tuple(self.names)
        slack = 0.2  # gravity or a push can carry a joint past a command limit; the spec must allow it
        spec = {"joint_pos": ArraySpec((len(names),), np.float32, (self.lower - slack).astype(np.float32),
                                       (self.upper + slack).astype(np.float32), "rad", names, "servo positions")}
        if "Present_Velocity" in self._read_names:
            spec["joint_vel"] = ArraySpec((len(names),), np.float32, unit="rad/s", names=names,
                                          description="servo velocities")
        if self.sensors is not None and self.sensors.camera is not None and self.cfg.camera.enabled:
            c = self.cfg.camera
            spec["image"] = ArraySpec((c.height, c.width, 3), np.uint8, 0, 255, description="camera, RGB")
        if self.sensors is not None and self.sensors.imu is not None:
            axes = ("x", "y", "z")
            spec["imu_gravity"] = ArraySpec((3,), np.float32, -1.0, 1.0, "unit vector", axes,
                                            "gravity direction in the body frame (IMU)")
            spec["imu_gyro"] = ArraySpec((3,), np.float32, unit="rad/s", names=axes,
                                         description="angular rate about the body axes (IMU)")
        spec |= self.task.observation_spec()
        if self.task.name != "joint_reach":
            spec["log/success"] = ArraySpec((), np.bool_, 0, 1, description="task success (not a policy input)")
        return spec | flag_specs()

    def _action_unit(self) -> str:
        m = self.cfg.motors
        return f"x{m.joint_delta} rad" if m.action_mode == "delta" else "[-1, 1] -> [lower, upper]"

    def _open(self) -> None:
        self.bus.open()
        self._bus_open = True
        warn_if_slow(self.cfg.motors.port)  # a 16 ms FTDI latency timer ruins the control rate: say so
        self._check_servos()
        self._configure()
        if self.sensors is not None:
            self.sensors.start()
        self._power_up()
        self.estop.start()

    def _check_servos(self) -> None:
        for sv in self.servos:
            number = self.bus.ping(sv.id)
            if number is None:
                number = self.bus.ping(sv.id)  # one more try before calling a servo missing
            if number is None:
                raise MotorError(f"{self.cfg.motors.port}: servo {sv.id} ({sv.name}) does not answer; check its "
                                 f"power, cable and id (reverie-robot scan --port {self.cfg.motors.port})")
            expected = MODELS[sv.model].model_number
            if number != expected:
                raise MotorConfigError(f"{self.cfg.motors.port}: servo {sv.id} ({sv.name}) is model number {number}, "
                                       f"the config says {sv.model} ({expected})")
            self._check_status(sv.id, sv.name)

    def _check_status(self, id: int, name: str) -> None:
        """A servo that answers but reports an error (overheating, overload, voltage) must not be powered up:
        say which one and what it reports, before any setting is written or torque comes on."""
        try:
            self.bus.read("Present_Position", id)
        except ServoFault as exc:
            raise ServoFault(exc.port, id, exc.faults, f"{exc.what} at start-up (joint {name}); torque stays off: "
                             "clear the cause, then power-cycle the servo") from None

    def _configure(self) -> None:
        """Torque off, then the settings that keep the servos safe: torque limits, the bus watchdog."""
        self._set_torque(False)
        dynamixel = self.cfg.motors.protocol == "dynamixel"
        for sv in self.servos:
            model = MODELS[sv.model]
            if self.bus.read("Return_Delay_Time", sv.id) != 0:  # factory 500 us per servo and sync read
                self._write_eeprom(sv.id, "Return_Delay_Time", 0)
            if dynamixel:
                self.bus.write("Bus_Watchdog", sv.id, 0)  # clears a watchdog that fired in an earlier run
                mode = POSITION_MODE
                if sv.torque_limit is not None:
                    if sv.model in NO_CURRENT_CONTROL:
                        raise MotorConfigError(f"servo {sv.id} ({sv.name}): torque_limit needs a current-sensing "
                                               f"model; {sv.model} has none")
                    mode = CURRENT_POSITION_MODE
                if self.bus.read("Operating_Mode", sv.id) != mode:
                    self.bus.write("Operating_Mode", sv.id, mode)
            if sv.torque_limit is not None:
                self.bus.write(model.torque_limit_register, sv.id, round(sv.torque_limit * model.torque_limit_max))
        watchdog_ms = self.cfg.safety.bus_watchdog_ms
        if dynamixel and watchdog_ms is not None:
            for sv in self.servos:  # takes effect once torque is on: the servos stop if this process goes silent
                self.bus.write("Bus_Watchdog", sv.id, max(1, round(watchdog_ms / 20)))
        elif not dynamixel:
            log.info("Feetech servos have no bus watchdog: if this process dies they hold their last goal with "
                     "torque on; wire a physical e-stop that cuts servo power")

    def _write_eeprom(self, id: int, name: str, value: int) -> None:
        """EEPROM writes need torque off (done) and, on Feetech, the Lock register opened around them."""
        feetech = self.cfg.motors.protocol == "feetech"
        if feetech:
            self.bus.write("Lock", id, 0)
        self.bus.write(name, id, value)
        if feetech:
            self.bus.write("Lock", id, 1)

    # --- bus helpers (the lock serialises the control loop, the watchdog and the e-stop) -------------------
    def _read(self) -> tuple[np.ndarray, np.ndarray | None]:
        """A read outside the control step (power-up, reset, hold, exit): whole sync reads are tried again, up
        to `safety.max_failed_ticks`, however long they take."""
        attempts = self.cfg.safety.max_failed_ticks
        for attempt in range(1, attempts + 1):
            try:
                with self._lock:
                    values = self.bus.sync_read(self._read_names, self.ids)
                break
            except ServoFault:
                raise
            except MotorError as exc:
                self.events.record("bus_fault", f"{exc} (read {attempt} of {attempts})")
                self._interrupted = True
                if attempt == attempts:
                    raise
        self._last = self._decode(values)
        return self._last

    def _read_tick(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The control step's read: it must end within `motors.read_budget_ms` (one control period unless set),
        retries included, or the robot cannot keep its rate. A read that runs out of time is a missed tick: the
        last positions stand in and the episode ends; `safety.max_failed_ticks` missed ticks in a row stop the
        robot (torque off) with the servos and the measured reply loss named."""
        stats = self.bus.stats
        expected, unanswered = stats.expected, dict(stats.unanswered)
        try:
            with self._lock:
                values = self.bus.sync_read(self._read_names, self.ids, deadline=time.monotonic() + self.read_budget)
        except ServoFault:
            raise
        except MotorError as exc:
            self._replies.append(self._reply_loss(expected, unanswered))
            if self._missed == 0:
                self._late_since = stats.late_bytes
            self._missed += 1
            self.events.record("bus_fault", f"{exc} (missed tick {self._missed} of {self.cfg.safety.max_failed_ticks})")
            self._interrupted = True
            if self._missed >= self.cfg.safety.max_failed_ticks:
                self._stop_for_rate()
            return self._last
        self._replies.append(self._reply_loss(expected, unanswered))
        self._missed = 0
        self._last = self._decode(values)
        return self._last

    def _reply_loss(self, expected: int, unanswered: dict[int, int]) -> tuple[int, dict[int, int]]:
        """(statuses awaited, {servo id: statuses missing}) since the bus counters read (expected, unanswered)."""
        stats = self.bus.stats
        lost = {id: n - unanswered.get(id, 0) for id, n in stats.unanswered.items() if n > unanswered.get(id, 0)}
        return stats.expected - expected, lost

    def _stop_for_rate(self) -> None:
        """Too many missed ticks in a row: the bus cannot keep the control rate. Torque off, and say why."""
        expected = sum(e for e, _ in self._replies)
        lost: dict[int, int] = {}
        for _, by_id in self._replies:
            for id, n in by_id.items():
                lost[id] = lost.get(id, 0) + n
        ranked = sorted((id for id in lost if id in self.ids), key=lambda id: -lost[id])
        m = self.cfg.motors
        share = sum(lost.values()) / max(expected, 1)
        budget = (f"motors.read_budget_ms={m.read_budget_ms:g}" if m.read_budget_ms is not None
                  else f"the control period ({1000 * self.period:.0f} ms)")
        if ranked:
            who = (f"servo{'s' if len(ranked) > 1 else ''} {', '.join(map(str, ranked))} missed replies ("
                   + ", ".join(f"{self.names[self.ids.index(id)]} {lost[id]}" for id in ranked) + "); ")
        else:
            who = "no reply was lost, the reads did not fit the period; "
        # Bytes found waiting before a later request came after their deadline: the bus answered, too late.
        late = self.bus.stats.late_bytes - self._late_since
        came = f"replies did come, too late ({late} bytes after their deadline); " if late else ""
        advice = PTY_HINT if is_pseudo_terminal(m.port) else "check the wiring, power and baud, or lower the margin"
        message = (f"{m.port}: the servo bus cannot keep control.hz={self.cfg.control.hz:g}: {self._missed} control "
                   f"ticks in a row had no complete read within {budget}; "
                   f"{who}{came}{100 * share:.0f} % of the {expected} replies awaited over the last "
                   f"{len(self._replies)} reads were lost (motors.timeout_margin_ms="
                   f"{1000 * self.bus.timeout_margin_s:g}, motors.retries={m.retries}): {advice}")
        self._fault = message
        self.events.record("bus_fault", message)
        self._torque_off_best_effort()
        raise MotorError(message)

    def _decode(self, values: dict[str, dict[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Positions (and velocities) in calibrated radians from a sync read's raw values."""
        ticks = np.array([values["Present_Position"][i] for i in self.ids])
        pos = self.calibration.to_radians(self.names, ticks)
        vel = None
        if "Present_Velocity" in values:
            units = np.array([values["Present_Velocity"][i] for i in self.ids], dtype=np.float64)
            scale = np.array([MODELS[sv.model].velocity_unit for sv in self.servos])
            directions = np.array([self.calibration.joints[n].direction for n in self.names])
            vel = units * scale * directions
        return pos, vel

    def _hold(self, present: np.ndarray) -> None:
        """Restart the command filter (and the delta action's base) from where the joints are."""
        self.filter.reset(present)
        self._goal = np.asarray(present, dtype=np.float64).copy()

    def _command(self, goal: np.ndarray) -> np.ndarray:
        """Pass a goal through the safety filter and send it; returns what was sent."""
        safe = self.filter(goal)
        self._write_goals(safe)
        self._goal = safe
        return safe

    def _power_up(self) -> None:
        """Torque on where the joints are: a servo drives to its Goal_Position register the moment torque comes
        on, and that register may hold a stale goal (an earlier run, a watchdog stop)."""
        present = self._read()[0]
        self._hold(present)
        self._write_goals(present)
        self._set_torque(True)

    def _write_goals(self, goals: np.ndarray) -> None:
        ticks = self.calibration.to_ticks(self.names, goals)
        with self._lock:
            if self._fault is not None:
                raise RobotError(f"{self.cfg.name}: stopped ({self._fault}); no command sent")
            self.bus.sync_write("Goal_Position", {i: int(t) for i, t in zip(self.ids, ticks)})

    def _set_torque(self, on: bool) -> None:
        with self._lock:
            self.bus.sync_write("Torque_Enable", {i: int(on) for i in self.ids})
            self._torque = on

    def _torque_off_best_effort(self) -> None:
        """Torque off on a possibly failing bus: the broadcast write, then each servo on its own."""
        try:
            self._set_torque(False)
        except Exception as exc:  # noqa: BLE001  (keep trying servo by servo)
            log.error("torque off by sync write failed (%s); trying each servo", exc)
        for sv in self.servos:
            try:
                with self._lock:
                    self.bus.write("Torque_Enable", sv.id, 0)
            except ServoFault as exc:  # it answered, with error bits: a hardware alarm still takes the write
                if not self._torque_reads_off(sv.id):
                    log.error("servo %d (%s): torque off failed (%s): CUT SERVO POWER", sv.id, sv.name, exc)
            except Exception as exc:  # noqa: BLE001
                log.error("servo %d (%s): torque off failed (%s): CUT SERVO POWER", sv.id, sv.name, exc)
        self._torque = False

    def _torque_reads_off(self, id: int) -> bool:
        """Whether servo `id` reads back torque off, whatever error bits come with the reply."""
        try:
            with self._lock:
                return self.bus.read("Torque_Enable", id, check=False) == 0
        except MotorError:
            return False

    # --- safety callbacks (other threads) ------------------------------------------------------------------
    def _on_watchdog(self) -> None:
        mode = self.cfg.safety.on_watchdog
        self.events.record("watchdog", f"no command for {self.cfg.safety.watchdog_s} s: {mode}")
        self._interrupted = True
        if mode == "torque_off":
            self._torque_off_best_effort()
            return
        try:
            present = self._read()[0]
            self._hold(present)
            self._write_goals(present)
        except Exception as exc:  # noqa: BLE001  (holding failed: the only safe state left is torque off)
            log.error("watchdog: holding position failed (%s); torque off", exc)
            self._torque_off_best_effort()

    def _on_estop(self, reason: str) -> None:
        self._fault = f"e-stop: {reason}"
        self.events.record("estop", reason)
        self._interrupted = True
        self._torque_off_best_effort()

    @property
    def goal(self) -> np.ndarray:
        """The goals last sent (after the safety filter), calibrated radians: what a delta action moves from."""
        return self._goal.copy()

    # --- Robot interface ------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self._check_fault()
        if not self._watching:  # armed with the first commands, not while the process is still starting
            self.watchdog.start()
            self._watching = True
        if not self._torque:  # after a watchdog torque-off: hold where it is, then power up again
            self._power_up()
        self._move_home()
        self._ready_scene()
        self._steps = 0
        self._interrupted = False
        self.events.take()
        return self._observation(first=True)

    def _move_home(self) -> None:
        """Walk every goal to the task's reset pose at the per-step cap, one control period per step."""
        self._hold(self._read()[0])
        self._walk(self.task.reset_pose(self.home), settle_s=0.25)  # arrive before the first observation

    def _ready_scene(self) -> None:
        """Until the task can begin: show what a person must do and wait (holding still) for `c` or `r`.
        An operator pause (`p`) waits here too. Without a terminal the episode starts anyway."""
        while True:
            request = self.task.begin(self._reading(self._sense(fresh=True)))
            if request is not None:
                log.warning("%s: a person is needed: %s", self.cfg.name, request)
                self.operator.request(request)
            answer = self.operator.wait(self._hold_still, self.period, stopped=lambda: self._fault is not None)
            self._check_fault()
            if request is None or answer == "running":  # ready, or nobody to ask (no terminal): begin
                return
            self._move_home()  # a person answered: back to the reset pose (they may have moved it), look again

    def _hold_still(self) -> None:
        self._command(self._goal)
        self.watchdog.feed()

    def send(self, action: np.ndarray | int) -> None:
        self._check_fault()
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        m = self.cfg.motors
        if m.action_mode == "delta":
            goal = self._goal + action * m.joint_delta
        else:
            goal = self.lower + (action + 1.0) * 0.5 * (self.upper - self.lower)
        self._command(goal)
        self.watchdog.feed()

    def observe(self) -> dict[str, np.ndarray]:
        self._check_fault()
        self._steps += 1
        return self._observation(first=False)

    def _observation(self, first: bool) -> dict[str, np.ndarray]:
        try:
            pos, vel = self._read_tick()
        except ServoFault as exc:
            self._fault = str(exc)
            self.events.record("servo_fault", str(exc))
            self._torque_off_best_effort()
            raise
        sensed = self._sense()
        outcome = self.task.step(self._reading(sensed, pos), first)
        events = self.events.take()
        interrupted = self._interrupted or bool(events)
        self._interrupted = False
        obs = {"joint_pos": pos.astype(np.float32)}
        if vel is not None:
            obs["joint_vel"] = vel.astype(np.float32)
        obs |= self._sensor_entries(sensed) | outcome.extras
        if "log/success" in self.observation_spec:
            obs["log/success"] = np.bool_(outcome.success)
        ended = None if first else (outcome.end or self.operator.take_episode_end())
        if ended:
            log.info("%s: episode ends: %s", self.cfg.name, ended)
        self.info = {"success": outcome.success, "end": ended}
        obs |= {
            "reward": np.float32(outcome.reward),
            "is_first": np.bool_(first),
            "is_last": np.bool_(not first and (interrupted or bool(ended) or outcome.terminal
                                               or self._steps >= self.cfg.control.episode_steps)),
            "is_terminal": np.bool_(not first and outcome.terminal),
        }
        return obs

    def _sense(self, fresh: bool = False) -> SensorFrame | None:
        if self.sensors is None:
            return None
        return self.sensors.fresh() if fresh else self.sensors.read()

    def _reading(self, sensed: SensorFrame | None, pos: np.ndarray | None = None) -> Reading:
        if pos is None:
            pos = self._read()[0]
        if sensed is None:
            return Reading(pos, time.monotonic())
        up = upright(sensed.imu.quaternion) if sensed.imu is not None else None
        tracker = self.sensors.tracker if self.sensors is not None else None
        return Reading(pos, sensed.time, tracker, up)

    def _sensor_entries(self, sensed: SensorFrame | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if sensed is None:
            return out
        if "image" in self.observation_spec and sensed.image is not None:
            out["image"] = sensed.image
        if sensed.imu is not None:
            out["imu_gravity"] = gravity_in_body(sensed.imu.quaternion)
            out["imu_gyro"] = np.asarray(sensed.imu.gyro, dtype=np.float32)
        return out

    def check_joint(self, index: int, delta: float = 0.15, settle_s: float = 0.6) -> dict[str, object]:
        """Move one joint a little toward the middle of its range through the safety layer, then back, and report
        how it followed: the first-motion check of a freshly wired and calibrated robot."""
        self._check_fault()
        start = self._read()[0]
        self._hold(start)
        middle = 0.5 * (self.lower[index] + self.upper[index])
        step = delta if start[index] <= middle else -delta
        goal = start.copy()
        goal[index] += step
        reached = self._walk(goal, settle_s)
        self._walk(start, settle_s)
        moved = float(reached[index] - start[index])
        others = float(np.abs(np.delete(reached - start, index)).max()) if len(start) > 1 else 0.0
        problem = ""  # the direction can only be judged by eye: the encoder agrees with itself
        if moved * step < 0 or abs(moved) < 0.5 * abs(step):
            problem = f"followed only {abs(moved):.3f} of {abs(step):.3f} rad: blocked, too weak, or torque limited"
        return {"joint": self.names[index], "id": self.ids[index], "commanded": round(step, 4),
                "moved": round(moved, 4), "others_moved": round(others, 4), "ok": not problem, "problem": problem}

    def _walk(self, goal: np.ndarray, settle_s: float) -> np.ndarray:
        """Command `goal` at the per-step cap, one control period per step, let it settle; return the position."""
        for _ in range(1000):
            sent = self._command(goal)
            self.watchdog.feed()
            if np.allclose(sent, np.clip(goal, self.lower, self.upper)):
                break
            time.sleep(self.period)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:  # keep talking to the servos (bus watchdog) while it settles
            self._command(goal)
            self.watchdog.feed()
            time.sleep(self.period)
        return self._read()[0]

    def _check_fault(self) -> None:
        if self._fault is not None:
            raise RobotError(f"{self.cfg.name}: stopped ({self._fault})")

    def stop(self) -> None:
        """Hold the present position and stop the watchdog (nothing will command the motors for a while)."""
        self.watchdog.stop()
        if self._closed or not self._torque or self._fault is not None:
            return
        try:
            present = self._read()[0]
            self._hold(present)
            self._write_goals(present)
        except Exception as exc:  # noqa: BLE001
            log.error("stop: holding position failed (%s); torque off", exc)
            self._torque_off_best_effort()

    def close(self) -> None:
        """Every exit path ends here: optionally move home, then torque off, then release the port."""
        if self._closed:
            return
        self._closed = True
        self.watchdog.stop()
        self.estop.close()
        if self.sensors is not None:
            self.sensors.close()
        if self._bus_open:
            if self.cfg.safety.on_exit == "home_then_torque_off" and self._fault is None and self._torque:
                self._exit_move()
            self._torque_off_best_effort()
            self.bus.close()

    def _exit_move(self) -> None:
        deadline = time.monotonic() + self.cfg.safety.exit_move_s
        try:
            self._hold(self._read()[0])
            while time.monotonic() < deadline:
                goal = self._command(self.home)
                if np.allclose(goal, np.clip(self.home, self.lower, self.upper)):
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))  # let it settle before torque off
                    break
                time.sleep(self.period)
        except Exception as exc:  # noqa: BLE001  (torque off follows regardless)
            log.error("moving home before torque off failed (%s)", exc)
