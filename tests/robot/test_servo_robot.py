"""The servo robot backend on the emulated bus: real driver, real protocol bytes on a pseudo-terminal,
the safety layer in between. The emulator's own registers say what reached the motors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import Config, load_config
from core.interface import RobotError
from core.link.protocol import decode
from robot.emulated.servo_bus import KinematicPlant
from robot.link.spool import SUFFIX, Spool
from robot.servo.errors import MotorError, ServoFault
from robot.servo.robot import ServoRobot
from sim.emulation.rig import emulate, true_calibration

ROOT = Path(__file__).resolve().parents[2]
SO101 = ROOT / "hardware_configs" / "so101_arm.yaml"
KOCH = ROOT / "hardware_configs" / "koch_arm.yaml"
DEADLINE = 30.0  # generous wait for something to happen (not a speed assertion)


# These tests are about the bus and the safety layer: the proprioceptive task, no camera or IMU.
PROPRIO = ("task=joint_reach", "camera.enabled=false", "sensors.camera=null", "sensors.imu=null")


def servo_cfg(path: Path, tmp: Path, *extra: str) -> Config:
    cfg = load_config(path, ["safety.estop_key=false", f"motors.calibration={tmp / 'calibration.json'}", *PROPRIO,
                             *extra])
    true_calibration(cfg).save(tmp / "calibration.json")
    return cfg


class Bench:
    """An emulated bus with a kinematic plant, and a config pointing at it."""

    def __init__(self, path: Path, tmp: Path, *extra: str) -> None:
        # Tests not about the watchdog give it (and the bus timeouts) room: a loaded CI machine may pause the
        # emulator thread for tens of milliseconds.
        extra = ("safety.watchdog_s=2.0", "motors.timeout_margin_ms=100", "motors.read_budget_ms=400", *extra)
        base = servo_cfg(path, tmp, *extra)
        home = [s.home for s in base.motors.servos]
        self.plant = KinematicPlant(len(home), initial=home)
        self.emulator = emulate(base, plant=self.plant).start()
        self.cfg = load_config(path, ["safety.estop_key=false", f"motors.calibration={tmp / 'calibration.json'}",
                                      f"motors.port={self.emulator.port}", *PROPRIO, *extra])
        self.ids = [s.id for s in self.cfg.motors.servos]

    def goals(self, robot: ServoRobot) -> np.ndarray:
        """The goals the emulated servos hold, as calibrated angles. A sync write has no reply: a read on the
        same bus first makes sure the emulator has taken every write sent before it."""
        robot.bus.ping(self.ids[0])
        ticks = np.array([self.emulator.register(i, "Goal_Position") for i in self.ids])
        return robot.calibration.to_radians(robot.names, ticks)

    def torque(self, robot: ServoRobot | None = None) -> list[bool]:
        if robot is not None:  # a sync write has no reply: a read first makes sure the emulator took it
            robot.bus.ping(self.ids[0])
        on = self.emulator.torque_enabled()
        return [on[i] for i in self.ids]

    def close(self) -> None:
        self.emulator.close()

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def so101(tmp_path):
    bench = Bench(SO101, tmp_path)
    yield bench
    bench.close()


def wait_for(condition, what: str, limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_reset_moves_home_and_observations_follow_the_spec(so101):
    with ServoRobot(so101.cfg) as robot:
        assert all(so101.torque(robot))
        obs = robot.reset()
        home = np.array([s.home for s in so101.cfg.motors.servos])
        np.testing.assert_allclose(obs["joint_pos"], home, atol=0.01)
        assert obs["is_first"] and not obs["is_last"]
        for key, spec in robot.observation_spec.items():
            assert spec.contains(np.asarray(obs[key])), key
        robot.send(np.ones(6, np.float32))
        time.sleep(0.05)
        obs = robot.observe()
        assert np.all(obs["joint_pos"] > home - 0.01) and obs["reward"] < 0
    assert not any(so101.torque())  # closing turned torque off


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.lists(st.floats(-1e6, 1e6) | st.sampled_from([np.nan, np.inf, -np.inf]), min_size=6,
                                 max_size=6), min_size=1, max_size=12), absolute=st.booleans())
def test_every_command_that_reaches_the_servos_is_within_limits_and_step_bounds(so101, actions, absolute):
    cfg = so101.cfg.model_copy(update={"motors": so101.cfg.motors.model_copy(
        update={"action_mode": "absolute" if absolute else "delta", "joint_delta": 0.5})})
    lower = np.array([s.lower for s in cfg.motors.servos])
    upper = np.array([s.upper for s in cfg.motors.servos])
    tick = 2 * np.pi / 4096
    with ServoRobot(cfg) as robot:
        robot.reset()
        previous = so101.goals(robot)
        for action in actions:
            robot.send(np.array(action, np.float32))
            goal = so101.goals(robot)
            assert np.all(goal >= lower - tick) and np.all(goal <= upper + tick)
            assert np.all(np.abs(goal - previous) <= cfg.safety.max_step + 2 * tick)
            previous = goal


def test_watchdog_cuts_torque_when_the_policy_stalls(tmp_path):
    # Long enough that a loaded CI machine pausing this process between the reset's commands does not fire it
    # again while the test looks at the torque registers.
    bench = Bench(SO101, tmp_path, "safety.on_watchdog=torque_off", "safety.watchdog_s=0.6")
    try:
        with ServoRobot(bench.cfg) as robot:
            robot.reset()
            robot.send(np.zeros(6, np.float32))
            assert all(bench.torque(robot))
            wait_for(lambda: not any(bench.torque()), "the watchdog to cut torque")  # the policy "stalls" here
            assert robot.events.counts.get("watchdog", 0) == 1 or robot.watchdog.fired == 1
            obs = robot.observe()
            assert obs["is_last"]  # the safety event ends the episode: the learner sees the boundary
            robot.reset()  # a new episode powers the servos up again
            assert all(bench.torque(robot))
    finally:
        bench.close()


def test_watchdog_holds_position_and_ends_the_episode(tmp_path):
    so101 = Bench(SO101, tmp_path, "safety.watchdog_s=0.3")
    with ServoRobot(so101.cfg) as robot:
        robot.reset()
        for _ in range(3):
            robot.send(np.ones(6, np.float32))
            time.sleep(0.02)
        wait_for(lambda: robot.watchdog.fired >= 1, "the watchdog to fire")
        time.sleep(0.1)
        np.testing.assert_allclose(so101.goals(robot), robot.observe()["joint_pos"], atol=0.02)  # holding here
        assert all(so101.torque(robot))
        robot.reset()
        obs = robot.observe()
        assert not obs["is_first"]
    so101.close()


def test_an_exception_in_the_control_code_leaves_torque_off(so101):
    with pytest.raises(ZeroDivisionError), ServoRobot(so101.cfg) as robot:
        robot.reset()
        robot.send(np.zeros(6, np.float32))
        assert all(so101.torque(robot))
        _ = 1 / 0
    assert not any(so101.torque())


def test_a_silent_servo_stops_the_robot_with_its_id_named(so101):
    """Each control tick's read is bounded by the period: a silent servo costs safety.max_failed_ticks ticks
    (each ending the episode), then stops the robot naming it."""
    with ServoRobot(so101.cfg) as robot:
        robot.reset()
        so101.emulator.faults.silent = {3}
        with pytest.raises(MotorError, match=r"servo 3 missed replies \(elbow_flex \d+\)"):
            for _ in range(so101.cfg.safety.max_failed_ticks):
                assert robot.observe()["is_last"]
        so101.emulator.faults.silent = set()
    assert not any(so101.torque())


def test_an_overload_error_bit_stops_the_robot_and_cuts_torque(so101):
    with ServoRobot(so101.cfg) as robot:
        robot.reset()
        so101.emulator.faults.error_bits = {6: 32}  # STS overload
        with pytest.raises(ServoFault, match=r"(?s)6.*overload"):
            robot.observe()
        with pytest.raises(RobotError, match="overload"):
            robot.send(np.zeros(6, np.float32))  # nothing moves after a fault
        so101.emulator.faults.error_bits = {}
    assert not any(so101.torque())


def test_dropped_and_corrupt_replies_are_retried_without_stopping(tmp_path):
    # Retries happen inside the control period: give them room (a 200 ms period, tries of ~30 ms).
    so101 = Bench(SO101, tmp_path, "control.hz=5", "motors.timeout_margin_ms=30")
    with so101, ServoRobot(so101.cfg) as robot:
        robot.reset()
        so101.emulator.faults.drop_rate = 0.02
        so101.emulator.faults.corrupt_rate = 0.02
        for _ in range(60):
            robot.send(np.zeros(6, np.float32))
            robot.observe()
        so101.emulator.faults.drop_rate = so101.emulator.faults.corrupt_rate = 0.0
        assert robot.bus.stats.retries > 0 and robot.bus.stats.corrupt > 0


def test_a_missing_servo_is_named_at_start(tmp_path):
    bench = Bench(SO101, tmp_path)
    try:
        bench.emulator.faults.silent = {4}
        with pytest.raises(MotorError, match="servo 4"):
            ServoRobot(bench.cfg)
    finally:
        bench.close()


def test_dynamixel_arm_enables_the_bus_watchdog_and_limits_gripper_current(tmp_path):
    bench = Bench(KOCH, tmp_path)
    try:
        with ServoRobot(bench.cfg) as robot:
            robot.reset()
            units = round(bench.cfg.safety.bus_watchdog_ms / 20)
            assert [bench.emulator.register(i, "Bus_Watchdog") for i in bench.ids] == [units] * 6
            gripper = next(s for s in bench.cfg.motors.servos if s.gripper)
            assert bench.emulator.register(gripper.id, "Operating_Mode") == 5
            assert 0 < bench.emulator.register(gripper.id, "Goal_Current") < 1750
    finally:
        bench.close()


def test_feetech_gripper_torque_is_limited(so101):
    with ServoRobot(so101.cfg):
        gripper = next(s for s in so101.cfg.motors.servos if s.gripper)
        assert so101.emulator.register(gripper.id, "Torque_Limit") == round(gripper.torque_limit * 1000)


# --- the robot process ------------------------------------------------------------------------------------------


def robot_process(cfg_path: Path, port: str, tmp: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "robot.cli", "run", "--config", str(cfg_path), "--learner", "tcp://127.0.0.1:9",
           "--spool", str(tmp / "spool"), "--duration", "120", "--set", f"motors.port={port}",
           "--set", f"motors.calibration={tmp / 'calibration.json'}", "--set", "safety.estop_key=false",
           *[word for item in PROPRIO for word in ("--set", item)], *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_torque_is_off_after_the_robot_process_is_signalled(so101, tmp_path, sig):
    proc = robot_process(SO101, so101.emulator.port, tmp_path)
    try:
        wait_for(lambda: all(so101.torque()) or proc.poll() is not None, "the robot to power up")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert not any(so101.torque())
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == "interrupted"


@pytest.mark.parametrize("source", ["file", "signal"])
def test_software_estop_stops_the_robot_at_once(so101, tmp_path, source):
    stop_file = tmp_path / "ESTOP"
    proc = robot_process(SO101, so101.emulator.port, tmp_path, "--set", f"safety.estop_file={stop_file}")
    try:
        wait_for(lambda: all(so101.torque()) or proc.poll() is not None, "the robot to power up")
        # Acting, not just powered up: a chunk of recorded steps is in the spool (no learner listens).
        wait_for(lambda: any((tmp_path / "spool").glob(f"*{SUFFIX}")) or proc.poll() is not None,
                 "the robot to record its first chunk")
        if source == "file":
            stop_file.touch()
        else:
            proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: not any(so101.torque()), "torque off after the e-stop")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 4, err[-3000:]
    assert "e-stop" in err and (str(stop_file) if source == "file" else "SIGUSR1") in err
    # No learner was reachable, so everything recorded waits in the spool; its last step ends the episode.
    spool = Spool(tmp_path / "spool", 2**30)
    last = decode(spool.load(spool.pending()[-1])).arrays
    assert last["is_last"][-1] and not last["is_terminal"][-1]


def test_exit_can_walk_home_before_torque_off(tmp_path):
    bench = Bench(SO101, tmp_path, "safety.on_exit=home_then_torque_off")
    try:
        home = np.array([s.home for s in bench.cfg.motors.servos])
        with ServoRobot(bench.cfg) as robot:
            robot.reset()
            for _ in range(8):  # walk away from home
                robot.send(np.ones(6, np.float32))
                time.sleep(0.02)
            away = robot.observe()["joint_pos"]
            assert np.abs(away - home).max() > 0.2
        positions = bench.plant.state()[0]
        assert not any(bench.torque())
        np.testing.assert_allclose(positions, home, atol=0.02)  # it was home when torque went off
    finally:
        bench.close()


@pytest.mark.parametrize("speed", [6.0, 0.02], ids=["follows", "too-weak"])
def test_reverie_robot_check_moves_each_joint_and_reports(tmp_path, capsys, speed):
    from robot.cli import main

    bench = Bench(SO101, tmp_path)
    bench.plant.max_speed = speed  # a servo that cannot keep up stands for a blocked or torque-limited joint
    try:
        code = main(["check", "--config", str(SO101), "--json", "--set", f"motors.port={bench.emulator.port}",
                     "--set", f"motors.calibration={tmp_path / 'calibration.json'}", "--set", "safety.estop_key=false",
                     "--set", "motors.timeout_margin_ms=100", "--delta", "0.1"])
        rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        bench.close()
    assert [r["joint"] for r in rows] == [s.name for s in bench.cfg.motors.servos]
    if speed > 1:
        assert code == 0 and all(r["ok"] and abs(r["moved"] - r["commanded"]) < 0.02 for r in rows), rows
    else:
        assert code == 1 and not any(r["ok"] for r in rows) and "followed only" in rows[0]["problem"]
    assert not any(bench.torque())


@pytest.mark.parametrize("fault", ["missing", "error_bit"])
def test_a_servo_fault_at_start_is_one_line_naming_the_servo_and_torque_stays_off(so101, tmp_path, fault):
    """`reverie-robot run` on a bus with a servo missing, or one reporting an error bit, at start: a
    one-line error naming the servo (and what the bit means), a non-zero exit, torque off."""
    if fault == "missing":
        so101.emulator.faults.silent = {4}
        named = r"servo 4 \(\w+\) does not answer"
    else:
        so101.emulator.faults.error_bits = {5: 4}  # STS bit 2: overheating
        named = r"servo 5 reports overheating"
    proc = robot_process(SO101, so101.emulator.port, tmp_path)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    so101.emulator.faults.silent, so101.emulator.faults.error_bits = set(), {}
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("reverie-robot:")]
    assert len(lines) == 1 and re.search(named, lines[0]), err[-3000:]
    assert not any(so101.torque())


def test_a_lossy_bus_that_cannot_keep_the_rate_stops_the_robot_naming_servos_and_loss(so101, tmp_path):
    """With motors.timeout_margin_ms=100 a lost reply cannot be waited for and retried inside a 50 ms control
    period. A bus losing a quarter of its replies must not let the robot crawl on (it did, at 1-2 Hz, and
    exited 0): it stops with torque off, a non-zero exit and a message naming servos and the measured loss."""
    so101.emulator.faults.drop_rate = 0.25
    proc = robot_process(SO101, so101.emulator.port, tmp_path, "--duration", "20",
                         "--set", "motors.timeout_margin_ms=100")
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    so101.emulator.faults.drop_rate = 0.0
    assert proc.returncode == 4, (out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])["stopped"]
    assert re.search(r"servos? \d+(, \d+)* missed replies", stopped), stopped
    assert re.search(r"\d+ % of the \d+ replies awaited", stopped), stopped
    assert "control period" in stopped and "timeout_margin_ms" in stopped, stopped
    assert not any(so101.torque())


def test_a_lossy_bus_with_room_to_retry_keeps_acting(tmp_path):
    """The same loss with a margin that leaves room for retries inside the period: every tick's read completes
    (retried within the tick), nothing stops."""
    bench = Bench(SO101, tmp_path, "motors.timeout_margin_ms=5", "motors.retries=6", "safety.max_failed_ticks=10")
    try:
        with ServoRobot(bench.cfg) as robot:
            robot.reset()
            bench.emulator.faults.drop_rate = 0.25
            for _ in range(40):
                robot.send(np.zeros(6, np.float32))
                robot.observe()
            bench.emulator.faults.drop_rate = 0.0
            assert robot.bus.stats.retries > 0 and bench.emulator.stats["dropped"] > 0
    finally:
        bench.close()
