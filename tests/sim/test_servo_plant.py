"""PyBullet physics behind the emulated servo bus: the plant alone (real time, its own thread), the
emulated bus in front of it (real pseudo-terminal, real pyserial, protocol bytes from the codec), the
true calibration, and `reverie-sim emulate` as a user runs it."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pybullet as p
import pytest
import serial
import yaml

from core.config import Config, config_from_dict, load_config
from robot.servo.calibration import Calibration
from robot.servo.codec import Codec, Packet
from robot.servo.protocols import codec_for
from robot.servo.tables import MODELS
from sim.emulation.rig import emulate, emulated_servos, true_calibration
from sim.emulation.servo_models import LIMIT_MARGIN, servo_model, urdf_path
from sim.emulation.servo_plant import PlantError, PyBulletPlant

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "hardware_configs"
SERVO_CONFIGS = ("so101_arm.yaml", "koch_arm.yaml", "servo_quadruped.yaml")
DEADLINE = 20.0  # generous wait for physics to get somewhere (not a speed assertion)
ELBOW = 2  # index of elbow_flex in the arm configs


def servo_config(name: str, *overrides: str) -> Config:
    return load_config(CONFIGS / name, list(overrides))


def wait_until(condition, what: str, limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def torque_all(plant: PyBulletPlant, on: bool = True) -> None:
    for i in range(len(plant.names)):
        plant.set_torque(i, on)


# ----- configs and models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_hardware_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


@pytest.mark.parametrize("name", SERVO_CONFIGS)
def test_each_servo_config_fits_its_model(name):
    cfg = servo_config(name)
    model = servo_model(cfg.emulator.model)
    client = p.connect(p.DIRECT)
    try:
        body = p.loadURDF(urdf_path(model.name), useFixedBase=model.fixed_base, physicsClientId=client)
        limits = {}
        for j in range(p.getNumJoints(body, physicsClientId=client)):
            info = p.getJointInfo(body, j, physicsClientId=client)
            limits[info[1].decode()] = (info[8], info[9])
    finally:
        p.disconnect(client)
    assert set(limits) == {s.name for s in cfg.motors.servos} == set(model.joints)
    for servo in cfg.motors.servos:  # the URDF stops lie just outside the commanded range
        low, high = limits[servo.name]
        assert low <= servo.lower and servo.upper <= high, servo.name
        assert servo.lower - low <= LIMIT_MARGIN + 0.2 and high - servo.upper <= LIMIT_MARGIN + 0.2, servo.name
    assert cfg.control.hz == 20 and cfg.task in ("marker_reach", "pick_place", "stand_walk")


def test_a_joint_the_model_lacks_is_named():
    raw = yaml.safe_load((CONFIGS / "koch_arm.yaml").read_text())
    raw["motors"]["servos"][3]["name"] = "tail_wag"
    cfg = config_from_dict(raw, "koch_arm.yaml (edited)")
    with pytest.raises(PlantError, match=r"motors\.servos\.3\.name: joint 'tail_wag' is not in .* 'koch'"):
        PyBulletPlant(cfg)


def test_a_config_without_an_emulator_model_is_refused():
    with pytest.raises(PlantError, match="emulator.model"):
        PyBulletPlant(servo_config("so101_arm.yaml", "emulator.model=null"))


# ----- the plant alone --------------------------------------------------------------------------------------------


@pytest.fixture
def so101():
    with PyBulletPlant(servo_config("so101_arm.yaml")) as plant:
        yield plant


def test_starts_at_home_with_torque_off(so101):
    cfg = servo_config("so101_arm.yaml")
    pos, _, load = so101.state()
    # It may have fallen a little under gravity since (torque is off at power-up), but not far.
    assert np.allclose(pos, [s.home for s in cfg.motors.servos], atol=0.2)
    assert np.all(load == 0.0)


def test_goals_are_tracked_over_real_time(so101):
    torque_all(so101)
    so101.set_goal(0, 0.8)
    errors = [abs(so101.state()[0][0] - 0.8)]
    speeds = []
    deadline = time.monotonic() + DEADLINE
    while errors[-1] > 0.01:
        assert time.monotonic() < deadline, f"shoulder_pan did not reach its goal; errors {errors[-10:]}"
        time.sleep(0.05)
        pos, vel, _ = so101.state()
        errors.append(abs(pos[0] - 0.8))
        speeds.append(abs(vel[0]))
    assert errors[0] > 0.5  # a real servo takes time: the STS3215 turns at most ~4.7 rad/s
    assert max(speeds) <= 4.7 * 1.1


def test_torque_off_lets_a_joint_fall_under_gravity(so101):
    torque_all(so101)
    so101.reset_pose([0.0, 0.0, 0.0, 0.0, 0.0, 0.2])  # upper arm up, forearm forward: the elbow carries it
    time.sleep(0.5)
    held = so101.state()[0][ELBOW]
    assert abs(held) < 0.05
    so101.set_torque(ELBOW, False)
    wait_until(lambda: so101.state()[0][ELBOW] > 0.6, "the forearm to fall")  # forward and down, to the floor
    assert so101.state()[2][ELBOW] == 0.0  # no motor, no load


def sag(plant: PyBulletPlant, fraction: float) -> tuple[float, float]:
    """Elbow error and load after holding the forearm out level with a torque limit of `fraction`."""
    plant.reset_pose([0.0, 0.0, 0.0, 0.0, 0.0, 0.2])
    plant.set_torque_limit(ELBOW, fraction)
    time.sleep(1.0)
    pos, _, load = plant.state()
    return abs(pos[ELBOW]), float(load[ELBOW])


def test_a_lower_torque_limit_lets_a_loaded_joint_sag_more(so101):
    torque_all(so101)
    full_error, full_load = sag(so101, 1.0)
    low_error, low_load = sag(so101, 0.1)
    assert full_error < 0.05 and 0.05 < abs(full_load) < 0.5  # holds the forearm, working against gravity
    assert low_error > full_error + 0.3  # 10 % of 2.9 N·m cannot hold it level
    assert abs(low_load) == pytest.approx(0.1, abs=0.02)  # pushing as hard as it is allowed to


def test_physics_runs_in_real_time(so101):
    sim0, wall0 = so101.sim_time, time.monotonic()
    time.sleep(1.0)
    sim, wall = so101.sim_time - sim0, time.monotonic() - wall0
    print(f"\nsimulated {sim:.3f} s in {wall:.3f} s of wall time ({so101.skipped} steps skipped since start)")
    assert sim <= wall + 2 * so101.dt  # never faster than real time
    assert sim > 0.3 * wall  # and not stalled (loose: the machine is shared)


def test_reset_pose_by_name_and_its_errors(so101):
    so101.reset_pose({"wrist_roll": 1.0})
    assert so101.state()[0][4] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(PlantError, match="tail"):
        so101.reset_pose({"tail": 0.0})
    with pytest.raises(PlantError, match="3 angles given for 6 servos"):
        so101.reset_pose([0.0, 0.0, 0.0])


def test_close_stops_the_thread_and_is_idempotent():
    plant = PyBulletPlant(servo_config("koch_arm.yaml"))
    plant.close()
    steps = plant.steps
    time.sleep(0.1)
    assert plant.steps == steps and not plant._thread.is_alive()
    plant.close()


def test_the_quadruped_stands_on_its_plane_and_crouches():
    cfg = servo_config("servo_quadruped.yaml")
    with PyBulletPlant(cfg) as plant:
        torque_all(plant)
        plant.reset_pose([s.home for s in cfg.motors.servos])
        time.sleep(1.0)
        standing = plant.link_position()[2]
        assert 0.13 < standing < 0.2 and plant.base_up() > 0.95  # on its feet, upright
        for i, servo in enumerate(cfg.motors.servos):
            plant.set_goal(i, cfg.joint_reach.target.get(servo.name, servo.home))
        wait_until(lambda: plant.link_position()[2] < standing - 0.02, "the body to crouch")
        torque_all(plant, False)
        wait_until(lambda: plant.link_position()[2] < 0.08, "the body to collapse with torque off")


# ----- the emulated bus in front of it ----------------------------------------------------------------------------


def request(port: serial.Serial, codec: Codec, packet: bytes, limit: float = 5.0) -> Packet:
    """Send one instruction and return the status packet that answers it."""
    port.reset_input_buffer()
    port.write(packet)
    buf = bytearray()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        buf += port.read(max(1, port.in_waiting))
        reply = codec.take(buf, status=True)
        if reply is not None:
            return reply
    raise AssertionError(f"no reply to {packet.hex(' ')} on {port.port}")


@pytest.mark.parametrize("name", SERVO_CONFIGS)
def test_emulate_answers_pings_through_a_serial_port(name):
    cfg = servo_config(name)
    codec = codec_for(cfg.motors.protocol)
    with emulate(cfg) as emulator, serial.Serial(emulator.port, cfg.motors.baud, timeout=0.05) as port:
        for servo in cfg.motors.servos:
            reply = request(port, codec, codec.ping(servo.id))
            assert (reply.id, reply.code) == (servo.id, 0)
            if codec.name == "dynamixel":  # the ping reply carries the model number
                assert int.from_bytes(reply.params[:2], "little") == MODELS[servo.model].model_number


def read_register(port: serial.Serial, codec: Codec, id: int, model: str, name: str) -> int:
    reg = MODELS[model].reg(name)
    reply = request(port, codec, codec.read(id, reg.address, reg.size))
    assert reply.code == 0, codec.error_names(reply.code)
    return codec.decode(reply.params, reg)


def write_register(port: serial.Serial, codec: Codec, id: int, model: str, name: str, value: int) -> None:
    reg = MODELS[model].reg(name)
    reply = request(port, codec, codec.write(id, reg.address, codec.encode(value, reg)))
    assert reply.code == 0, codec.error_names(reply.code)


@pytest.mark.parametrize("name", ["so101_arm.yaml", "koch_arm.yaml"])
def test_a_goal_sent_over_the_bus_moves_the_physics(name):
    cfg = servo_config(name)
    codec = codec_for(cfg.motors.protocol)
    calibration = true_calibration(cfg)
    pan = cfg.motors.servos[0]
    with emulate(cfg) as emulator, serial.Serial(emulator.port, cfg.motors.baud, timeout=0.05) as port:
        plant = emulator.owned_plant
        ticks = read_register(port, codec, pan.id, pan.model, "Present_Position")
        assert calibration.to_radians([pan.name], np.array([ticks]))[0] == pytest.approx(plant.state()[0][0],
                                                                                        abs=0.01)
        goal = int(calibration.to_ticks([pan.name], np.array([0.6]))[0])
        write_register(port, codec, pan.id, pan.model, "Torque_Enable", 1)
        write_register(port, codec, pan.id, pan.model, "Goal_Position", goal)

        def angle() -> float:
            ticks = read_register(port, codec, pan.id, pan.model, "Present_Position")
            return float(calibration.to_radians([pan.name], np.array([ticks]))[0])

        wait_until(lambda: abs(angle() - 0.6) < 0.02, f"{pan.name} to reach 0.6 rad through the bus")
        assert abs(plant.state()[0][0] - 0.6) < 0.03
        assert emulator.torque_enabled()[pan.id]
    assert not plant._thread.is_alive()  # closing the emulator closed the plant it made


# ----- the true calibration ---------------------------------------------------------------------------------------


def test_true_calibration_matches_the_emulated_servos(tmp_path):
    cfg = servo_config("so101_arm.yaml")
    servos = emulated_servos(cfg)
    zeros = [s.zero_ticks for s in servos]
    assert all(abs(z - 2048) <= cfg.emulator.offset_spread for z in zeros)
    assert len(set(zeros)) > 1  # offsets differ per servo: calibration has something to find
    assert [s.zero_ticks for s in emulated_servos(cfg)] == zeros  # seeded
    assert [s.zero_ticks for s in emulated_servos(servo_config("so101_arm.yaml", "seed=1"))] != zeros
    assert [s.zero_ticks for s in emulated_servos(servo_config("so101_arm.yaml", "emulator.offset_spread=0"))] \
        == [2048] * len(zeros)
    true_calibration(cfg).save(tmp_path / "cal.json")
    loaded = Calibration.load(tmp_path / "cal.json", cfg.motors.servos)
    for servo, emulated in zip(cfg.motors.servos, servos):
        joint = loaded.joints[servo.name]
        assert (joint.id, joint.zero_ticks, joint.direction) == (servo.id, emulated.zero_ticks, 1)
        low, high = loaded.range_radians(servo.name)
        assert low == pytest.approx(servo.lower, abs=2 * math.pi / 4096)
        assert high == pytest.approx(servo.upper, abs=2 * math.pi / 4096)


# ----- reverie-sim emulate ----------------------------------------------------------------------------------------


def emulate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sim.cli", "emulate", *args]


def test_reverie_sim_emulate_serves_for_a_duration(tmp_path):
    cal = tmp_path / "cal.json"
    cmd = emulate_command("--config", str(CONFIGS / "so101_arm.yaml"), "--duration", "3",
                          "--write-calibration", str(cal), "--drop-rate", "0.1")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    port = re.search(r"serial port: (/dev/pts/\d+)", result.stdout)
    assert port, result.stdout
    assert f"--set motors.port={port.group(1)}" in result.stdout and "reverie-robot run --config" in result.stdout
    assert re.search(r"torque on 0/6 \| shoulder_pan=", result.stdout), result.stdout  # a status line
    cfg = servo_config("so101_arm.yaml")
    saved = Calibration.load(cal, cfg.motors.servos)
    assert saved.joints == true_calibration(cfg).joints


def test_reverie_sim_emulate_stops_on_sigterm():
    cmd = emulate_command("--config", str(CONFIGS / "koch_arm.yaml"), "--no-timing")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serial port:" in line:
                break
        assert any("serial port: /dev/pts/" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]  # generous: a loaded CI machine (once took > 60 s, not reproduced)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "emulated bus closed" in rest


def test_reverie_sim_emulate_refuses_a_config_without_motors():
    result = subprocess.run(emulate_command("--config", str(CONFIGS / "sim_arm_reach.yaml"), "--duration", "1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no motors block" in result.stderr


def test_reverie_sim_emulate_names_what_it_cannot_do(tmp_path):
    koch = str(CONFIGS / "koch_arm.yaml")
    bad_baud = subprocess.run(emulate_command("--config", koch, "--set", "motors.baud=1234", "--duration", "1"),
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_baud.returncode == 2 and "xl430-w250 cannot run at 1234 bit/s" in bad_baud.stderr
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    bad_file = subprocess.run(emulate_command("--config", koch, "--write-calibration", str(blocked / "cal.json"),
                                              "--duration", "1"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_file.returncode == 2 and f"--write-calibration {blocked / 'cal.json'}" in bad_file.stderr
