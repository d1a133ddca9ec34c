"""`reverie-robot scan / setup-motor / calibrate` against emulated servos on a pseudo-terminal, and the
calibration file they write (ticks <-> radians, load errors)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import load_config
from robot.cli import main
from robot.emulated.servo_bus import EmulatedServo, KinematicPlant, ServoEmulator
from robot.servo.bus import MotorBus
from robot.servo.calibration import Calibration, JointCalibration, default_path
from robot.servo.errors import MotorConfigError
from robot.tools.servos import RANGE_PROMPT, SCAN_COLUMNS, ZERO_PROMPT

ROOT = Path(__file__).resolve().parents[2]
SO101 = ROOT / "hardware_configs" / "so101_arm.yaml"
CLI = ROOT / ".venv" / "bin" / "reverie-robot"
IDS = "0-12"  # a short id range keeps a sweep over every baud quick


# ----- scan -----------------------------------------------------------------------------------------


def test_scan_finds_servos_at_a_non_default_baud(capsys: pytest.CaptureFixture[str]) -> None:
    specs = [EmulatedServo(3, "sts3215", baud=115_200), EmulatedServo(9, "sts3215", baud=115_200)]
    with ServoEmulator("feetech", specs) as emu:
        assert main(["scan", "--port", emu.port, "--protocol", "feetech", "--ids", IDS, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found == [{"id": i, "model": "sts3215", "model_number": 777, "firmware": 3, "protocol": "feetech",
                      "baud": 115_200} for i in (3, 9)]
    assert all(list(s) == list(SCAN_COLUMNS) for s in found)


def test_scan_table_and_nothing_found(capsys: pytest.CaptureFixture[str]) -> None:
    with ServoEmulator("dynamixel", [EmulatedServo(4, "xm430-w350", baud=57_600)]) as emu:
        assert main(["scan", "--port", emu.port, "--protocol", "dynamixel", "--baud", "57600", "--ids", IDS]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == list(SCAN_COLUMNS)
        assert table[1].split() == ["4", "xm430-w350", "1020", "52", "dynamixel", "57600"]
        assert main(["scan", "--port", emu.port, "--protocol", "dynamixel", "--baud", "1000000", "--ids", IDS]) == 1
    err = capsys.readouterr().err
    assert f"no servo answered on {emu.port}" in err and "powered" in err and "latency timer" in err


def test_scan_as_a_subprocess_across_protocols() -> None:
    if not CLI.exists():
        pytest.skip("the reverie-robot entry point is not installed in .venv")
    with ServoEmulator("dynamixel", [EmulatedServo(2, "xl330-m288", baud=2_000_000)]) as emu:
        result = subprocess.run([str(CLI), "scan", "--port", emu.port, "--ids", "0-3", "--json"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"id": 2, "model": "xl330-m288", "model_number": 1200, "firmware": 52,
                                          "protocol": "dynamixel", "baud": 2_000_000}]
    assert "feetech" in result.stderr  # the progress bar went through both protocols


def test_missing_port_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(tmp_path / "ttyACM7")
    assert main(["scan", "--port", port, "--protocol", "feetech", "--baud", "1000000"]) == 2
    assert f"port {port} does not exist" in capsys.readouterr().err


# ----- setup-motor ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "model", "factory_baud", "new_baud"), [
    ("feetech", "sts3215", 1_000_000, 115_200),
    ("dynamixel", "xl330-m077", 57_600, 1_000_000),
])
def test_setup_motor_changes_id_and_baud(protocol: str, model: str, factory_baud: int, new_baud: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with ServoEmulator(protocol, [EmulatedServo(1, model, baud=factory_baud)]) as emu:
        rc = main(["setup-motor", "--port", emu.port, "--protocol", protocol, "--id", "7", "--baud",
                   str(new_baud), "--ids", IDS])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "id 1 -> 7" in out and f"baud {factory_baud} -> {new_baud}" in out and "verified" in out
        assert emu.register(7, "ID") == 7
        with MotorBus(emu.port, protocol, factory_baud, timeout_margin_s=0.3) as bus:
            assert bus.ping(1) is None and bus.ping(7) is None  # gone from the old id and baud
            bus.set_baud(new_baud)
            assert bus.ping(7) is not None and bus.read("ID", 7) == 7
            if protocol == "feetech":
                assert bus.read("Lock", 7) == 1  # locked again after the EEPROM writes
        assert not any(emu.torque_enabled().values())


def test_setup_motor_refuses_two_servos(capsys: pytest.CaptureFixture[str]) -> None:
    specs = [EmulatedServo(1, "sts3215"), EmulatedServo(2, "sts3215", baud=500_000)]
    with ServoEmulator("feetech", specs) as emu:
        rc = main(["setup-motor", "--port", emu.port, "--protocol", "feetech", "--id", "5", "--ids", IDS])
        err = capsys.readouterr().err
        assert rc == 2, err
        for part in ("2 servos answered", "id 1 (sts3215) at 1000000", "id 2 (sts3215) at 500000"):
            assert part in err, err
        assert emu.register(1, "ID") == 1 and emu.register(2, "ID") == 2  # nothing was written


def test_setup_motor_with_no_servo(capsys: pytest.CaptureFixture[str]) -> None:
    with ServoEmulator("feetech", [EmulatedServo(50, "sts3215")]) as emu:
        assert main(["setup-motor", "--port", emu.port, "--protocol", "feetech", "--id", "5", "--ids", IDS]) == 2
    assert "no servo answered at any baud" in capsys.readouterr().err


# ----- calibrate ------------------------------------------------------------------------------------

# SO-101 servos as assembled: shoulder_pan's zero sits near the encoder's seam, wrist_flex turns backwards.
ZEROS = {1: 300, 2: 2300, 3: 1800, 4: 2100, 5: 2048, 6: 1500}
DIRECTIONS = {1: 1, 2: 1, 3: 1, 4: -1, 5: 1, 6: 1}
# Poses of the range sweep (joint angles of the plant, rad); the gripper never reaches its upper 1.5.
SWEEP = [[-1.95, -1.8, -1.7, -1.8, -2.8, 0.0], [1.95, 1.8, 1.7, 1.8, 2.8, 1.0], [0.2, 0.1, 0.0, 0.3, 0.0, 0.4]]


class Output(threading.Thread):
    """Collects a child's stdout so the test can wait for a prompt (prompts end without a newline)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc, self.stream, self.text, self.lock = proc, proc.stdout, "", threading.Lock()

    def run(self) -> None:
        while chunk := os.read(self.stream.fileno(), 4096):
            with self.lock:
                self.text += chunk.decode()

    def wait_for(self, marker: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if marker in self.text:
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {marker!r}:\n{self.text}\n"
                                     f"{self.proc.stderr.read().decode()}")
            time.sleep(0.02)
        raise AssertionError(f"no {marker!r} in the output within {timeout} s:\n{self.text}")


def wait_sync_reads(emu: ServoEmulator, count: int, timeout: float = 30.0) -> None:
    """Until the calibrate process has read positions `count` more times (so it saw the present pose)."""
    target = emu.stats["sync_reads"] + count
    deadline = time.monotonic() + timeout
    while emu.stats["sync_reads"] < target:
        assert time.monotonic() < deadline, "the calibration sampler stopped reading"
        time.sleep(0.01)


def unwrap(ticks: int, zero: int) -> int:
    return zero + (ticks - zero + 2048) % 4096 - 2048


def so101_emulator(ids: list[int]) -> tuple[ServoEmulator, KinematicPlant]:
    plant = KinematicPlant(len(ids), initial=[0.4] * len(ids))
    specs = [EmulatedServo(i, "sts3215", zero_ticks=ZEROS[i], direction=DIRECTIONS[i]) for i in ids]
    return ServoEmulator("feetech", specs, plant), plant


def test_calibrate_records_zero_and_range_through_a_pipe(tmp_path: Path) -> None:
    out = tmp_path / "so101.json"
    emu, plant = so101_emulator([1, 2, 3, 4, 5, 6])
    with emu:
        proc = subprocess.Popen([sys.executable, "-m", "robot.cli", "calibrate", "--config", str(SO101), "--set",
                                 f"motors.port={emu.port}", "--out", str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        output = Output(proc)
        output.start()
        try:
            output.wait_for(ZERO_PROMPT)
            for i in range(6):
                plant.move(i, 0.0)
            zero = {i: emu.register(i, "Present_Position") for i in ZEROS}
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            output.wait_for(RANGE_PROMPT)
            seen = {i: [zero[i]] for i in ZEROS}
            for pose in SWEEP:
                for joint, angle in enumerate(pose):
                    plant.move(joint, angle)
                wait_sync_reads(emu, 3)
                for i in ZEROS:
                    seen[i].append(unwrap(emu.register(i, "Present_Position"), zero[i]))
            assert not any(emu.torque_enabled().values())
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
        finally:
            proc.kill()
            proc.wait()
        output.join(timeout=10)
        assert not any(emu.torque_enabled().values())
    assert zero == ZEROS  # the emulated servos read their mounting offsets at angle 0
    data = json.loads(out.read_text())
    joints = data["joints"]
    names = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
    for name, i in zip(names, ZEROS):
        assert joints[name]["id"] == i and joints[name]["zero_ticks"] == zero[i]
        assert (joints[name]["min_ticks"], joints[name]["max_ticks"]) == (min(seen[i]), max(seen[i])), name
    assert joints["shoulder_pan"]["min_ticks"] < 0  # recorded across the seam, unwrapped
    lines = {line.split()[0]: line for line in output.text.splitlines() if "(servo" in line}
    assert "WARNING" in lines["gripper"] and "WARNING" not in lines["shoulder_pan"]
    cfg = load_config(SO101)
    calibration = Calibration.load(out, cfg.motors.servos)
    low, high = calibration.range_radians("shoulder_pan")
    assert low == pytest.approx(-1.95, abs=2e-3) and high == pytest.approx(1.95, abs=2e-3)


def test_calibrate_names_a_missing_servo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emu, _ = so101_emulator([1, 2, 3, 4, 5])
    with emu:
        rc = main(["calibrate", "--config", str(SO101), "--set", f"motors.port={emu.port}", "--out",
                   str(tmp_path / "c.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "servo 6 (gripper) did not answer" in err and emu.port in err
    assert not (tmp_path / "c.json").exists()


def test_calibrate_refuses_joints_that_did_not_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Enter pressed twice with nothing moved (against an emulated bus, whose joints no hand turns): no joint has a
    usable range, so nothing is written; the error names every still servo with its measured range, and on a
    pseudo-terminal points to the calibration `reverie-sim emulate` writes."""
    out = tmp_path / "c.json"
    emu, plant = so101_emulator([1, 2, 3, 4, 5, 6])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n"))
    with emu:
        rc = main(["calibrate", "--config", str(SO101), "--set", f"motors.port={emu.port}", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"calibration refused, {out} not written" in err, err
    assert "servo 1 (shoulder_pan) [+0.000, +0.000] rad" in err and "servo 6 (gripper) [+0.000, +0.000] rad" in err
    assert "--write-calibration" in err
    assert not out.exists()


def test_calibrate_without_a_motors_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--config", str(ROOT / "hardware_configs" / "sim_arm_reach.yaml")]) == 2
    assert "motors" in capsys.readouterr().err


# ----- the calibration file -------------------------------------------------------------------------


def so101_servos():
    return load_config(SO101).motors.servos


def test_ticks_and_radians(tmp_path: Path) -> None:
    cal = Calibration({"a": JointCalibration(1, 300, 1, -900, 1500), "b": JointCalibration(2, 2048, -1, 1000, 3000)},
                      {"a": 4096, "b": 4096})
    ticks = np.array([300 - 1024, 2048 + 512])
    assert cal.to_radians(["a", "b"], ticks) == pytest.approx([-math.pi / 2, -math.pi / 4])
    assert cal.to_radians(["a"], np.array([4096 + 300 - 1024])) == pytest.approx([-math.pi / 2])  # the seam
    assert cal.to_ticks(["b", "a"], np.array([-math.pi / 4, -math.pi / 2])).tolist() == [2048 + 512, 300 - 1024]
    batch = np.array([[300, 2048], [300 + 2048 - 1, 2048 - 1]])
    assert cal.to_radians(["a", "b"], batch).shape == (2, 2)
    assert cal.range_radians("b") == pytest.approx((-952 * 2 * math.pi / 4096, 1048 * 2 * math.pi / 4096))  # flipped
    assert cal.range_radians("a") == pytest.approx((-1200 * 2 * math.pi / 4096, 1200 * 2 * math.pi / 4096))
    with pytest.raises(MotorConfigError, match="no joint 'c'"):
        cal.to_radians(["c"], np.zeros(1))


@settings(max_examples=200, deadline=None)
@given(zero=st.integers(0, 4095), direction=st.sampled_from([1, -1]),
       angle=st.floats(-3.0, 3.0, allow_nan=False))
def test_angles_survive_a_round_trip_through_ticks(zero: int, direction: int, angle: float) -> None:
    cal = Calibration({"j": JointCalibration(1, zero, direction, 0, 4095)})
    ticks = cal.to_ticks(["j"], np.array([angle]))
    assert ticks.dtype == np.int64
    assert cal.to_radians(["j"], ticks % 4096)[0] == pytest.approx(angle, abs=math.pi / 4096 + 1e-9)


def test_save_load_round_trip(tmp_path: Path) -> None:
    servos = so101_servos()
    joints = {s.name: JointCalibration(s.id, 2000 + s.id, -1 if s.id == 4 else 1, 1000, 3000) for s in servos}
    path = tmp_path / "nested" / "cal.json"
    Calibration(joints).save(path)
    text = path.read_text()
    assert text.startswith("{\n") and '"format": "reverie-calibration"' in text  # readable, editable
    loaded = Calibration.load(path, servos)
    assert loaded.joints == joints and loaded.ticks_per_rev == dict.fromkeys(joints, 4096)
    assert not loaded.emulated and '"emulated"' not in text  # a recorded calibration is the hardware's own
    assert [p.name for p in path.parent.iterdir()] == ["cal.json"]  # no temp file left behind


def test_an_emulated_calibration_never_drives_a_real_robot(tmp_path: Path) -> None:
    """`reverie-sim emulate --write-calibration` marks its file emulated: a person trying the guide leaves it at
    the default path, and a robot on a real port refuses it (on a pseudo-terminal, the emulated bus, it is used)."""
    from robot.servo.robot import ServoRobot
    from sim.emulation.rig import true_calibration

    cfg = load_config(SO101)
    path = tmp_path / "so101_arm.json"
    true_calibration(cfg).save(path)
    assert '"emulated": true' in path.read_text() and Calibration.load(path, cfg.motors.servos).emulated
    real = load_config(SO101, [f"motors.calibration={path}", "motors.port=/dev/ttyUSB-reverie-test"])
    with pytest.raises(MotorConfigError, match=f"calibration file {path} was written by `reverie-sim emulate`.*"
                                               "/dev/ttyUSB-reverie-test is not an emulated bus"):
        ServoRobot(real, sensors=False)


def _saved(tmp_path: Path, edit) -> Path:
    servos = so101_servos()
    data = Calibration({s.name: JointCalibration(s.id, 2048, 1, 1000, 3000) for s in servos}).to_dict()
    edit(data)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["joints"].pop("elbow_flex"), "no entry for joint 'elbow_flex' \\(servo 3\\)"),
    (lambda d: d["joints"]["wrist_roll"].update(id=9), "joint 'wrist_roll': key 'id' is 9 but the config puts this "
                                                       "joint on servo 5"),
    (lambda d: d["joints"]["gripper"].update(zero_ticks="2048"), "joint 'gripper': key 'zero_ticks' must be an "
                                                                  "integer, found '2048'"),
    (lambda d: d["joints"]["gripper"].pop("max_ticks"), "joint 'gripper': key 'max_ticks' is missing"),
    (lambda d: d["joints"]["shoulder_pan"].update(direction=0), "key 'direction' must be 1 or -1"),
    (lambda d: d["joints"]["shoulder_pan"].update(min_ticks=4000), "key 'min_ticks' \\(4000\\) is above"),
    (lambda d: d.update(version=7), "key 'version' is 7"),
    (lambda d: d.pop("format"), "not a Reverie calibration"),
    (lambda d: d.update(joints=[]), "key 'joints' must be an object"),
])
def test_load_errors_name_file_joint_and_key(tmp_path: Path, edit, message: str) -> None:
    path = _saved(tmp_path, edit)
    with pytest.raises(MotorConfigError, match=message) as info:
        Calibration.load(path, so101_servos())
    assert str(path) in str(info.value)


def test_load_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x80\x04K\x01.")  # a pickle is not JSON, and is never unpickled
    with pytest.raises(MotorConfigError, match=f"calibration file {bad}: not readable JSON"):
        Calibration.load(bad, so101_servos())
    with pytest.raises(MotorConfigError, match="calibration file .*missing.json not found: run `reverie-robot "
                                               "calibrate"):
        Calibration.load(tmp_path / "missing.json", so101_servos())


def test_default_calibration_and_path(caplog: pytest.LogCaptureFixture) -> None:
    servos = so101_servos()
    with caplog.at_level(logging.WARNING):
        cal = Calibration.default(servos)
    assert "no calibration file" in caplog.text
    assert {j.zero_ticks for j in cal.joints.values()} == {2048}
    assert cal.to_radians(["gripper"], np.array([2048]))[0] == 0.0
    cfg = load_config(SO101)
    assert default_path(cfg) == Path("calibration/so101_arm.json")
    assert default_path(load_config(SO101, ["motors.calibration=/tmp/h2-x.json"])) == Path("/tmp/h2-x.json")
