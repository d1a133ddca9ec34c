"""The BNO055 IMU over UART: request bytes as the datasheet spells them, the emulated chip spoken to through a
real pty and pyserial, the driver against it (modes, units, scaling, calibration bits, retried overruns, a silent
chip), and the emulated chip strapped to the PyBullet quadruped."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import serial

from core.config import load_config
from robot.emulated.imu import EmulatedBNO055, euler_from_quaternion
from robot.sensors.imu import BNO055, ImuError, read_request, write_request
from sim.emulation.imu_plant import pybullet_imu_source, quat_multiply, rotate_into
from sim.emulation.servo_plant import PyBulletPlant

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 1.0  # generous: the emulator answers within a few ms
QUAT_LSB = 1 / 2**14
RAD_LSB = 1 / 900


def axis_quat(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    """(w, x, y, z) of a rotation by `angle` about the unit `axis`."""
    return np.array([math.cos(angle / 2), *(math.sin(angle / 2) * np.asarray(axis))])


class Still:
    """A settable source: the chip held at one orientation, turning at one rate."""

    def __init__(self) -> None:
        self.quat = np.array([1.0, 0.0, 0.0, 0.0])
        self.gyro = np.zeros(3)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.quat, self.gyro


@pytest.fixture
def held() -> Still:
    return Still()


@pytest.fixture
def chip(held: Still) -> Iterator[EmulatedBNO055]:
    with EmulatedBNO055(held, seed=1) as emulator:
        yield emulator
        assert emulator.stats["internal_errors"] == 0


def ask(port: serial.Serial, request: bytes, n: int) -> bytes:
    """Send raw bytes, return the first `n` bytes answered (fewer if none come within WAIT_S)."""
    port.reset_input_buffer()
    port.write(request)
    out = b""
    deadline = time.monotonic() + WAIT_S
    while len(out) < n and time.monotonic() < deadline:
        out += port.read(n - len(out))
    return out


# ----- request bytes --------------------------------------------------------------------------------------------


def test_request_bytes_are_the_datasheets():
    assert read_request(0x00, 1) == bytes.fromhex("AA 01 00 01")
    assert read_request(0x14, 34) == bytes.fromhex("AA 01 14 22")
    assert write_request(0x3D, b"\x0c") == bytes.fromhex("AA 00 3D 01 0C")
    assert write_request(0x55, bytes(range(1, 7))) == bytes.fromhex("AA 00 55 06 01 02 03 04 05 06")
    with pytest.raises(ValueError, match="length 0"):
        write_request(0x3D, b"")
    with pytest.raises(ValueError, match="length 129"):
        read_request(0x00, 129)
    with pytest.raises(ValueError, match="0x80"):
        read_request(0x80, 1)


# ----- the emulated chip, raw bytes ---------------------------------------------------------------------------


def test_emulated_chip_answers_raw_requests(chip):
    with serial.Serial(chip.port, 115200, timeout=0.05) as port:
        assert ask(port, bytes.fromhex("AA 01 00 04"), 6) == bytes.fromhex("BB 04 A0 FB 32 0F")  # chip, acc, mag, gyr
        assert ask(port, bytes.fromhex("AA 01 3D 01"), 3) == bytes.fromhex("BB 01 00")  # powers up in CONFIG
        assert ask(port, bytes.fromhex("AA 00 3B 01 06"), 2) == bytes.fromhex("EE 01")
        assert ask(port, bytes.fromhex("AA 01 3B 01"), 3) == bytes.fromhex("BB 01 06")
        assert ask(port, bytes.fromhex("AA 00 00 01 55"), 2) == bytes.fromhex("EE 05")  # CHIP_ID is read-only
        assert ask(port, bytes.fromhex("AA 01 7F 02"), 2) == bytes.fromhex("EE 04")  # past the page
        assert ask(port, bytes.fromhex("AA 01 00 00"), 2) == bytes.fromhex("EE 09")
        assert ask(port, bytes.fromhex("AA 01 00 81"), 2) == bytes.fromhex("EE 08")
        assert ask(port, bytes.fromhex("AA 00 3D 01 0F"), 2) == bytes.fromhex("EE 03")  # no mode 0x0F
        assert ask(port, bytes.fromhex("55 01 00 01"), 2) == bytes.fromhex("EE 06")
        assert ask(port, bytes.fromhex("AA 01 00"), 2) == bytes.fromhex("EE 0A")  # a request cut short
        assert ask(port, bytes.fromhex("AA 01 00 01"), 3) == bytes.fromhex("BB 01 A0")  # and it recovers
    assert chip.mem[0x00] == 0xA0


def test_emulated_chip_hears_only_115200_baud(chip):
    with serial.Serial(chip.port, 57600, timeout=0.05) as port:
        assert ask(port, bytes.fromhex("AA 01 00 01"), 3) == b""
    assert chip.stats["wrong_baud"] >= 1


# ----- the driver against the emulated chip ------------------------------------------------------------------


def test_open_checks_the_chip_and_starts_fusion_in_radians(chip):
    with BNO055(chip.port) as imu:
        assert chip.mode == 0x0C and chip.mem[0x3B] == 0x06
        assert imu.read_register(0x00, 1) == b"\xa0"
        opened = list(chip.requests)
        imu.read()
    assert [r.hex(" ").upper() for r in opened] == [
        "AA 01 00 01",  # CHIP_ID
        "AA 00 3D 01 00", "AA 01 3D 01",  # CONFIG, read back
        "AA 00 3B 01 06",  # UNIT_SEL: rad/s, rad
        "AA 00 3D 01 0C", "AA 01 3D 01",  # NDOF, read back
        "AA 01 3B 01",  # UNIT_SEL read back
        "AA 01 00 01",  # the read_register above
    ]
    assert chip.requests[-1] == bytes.fromhex("AA 01 14 22")  # read(): one burst, gyro .. CALIB_STAT


def test_a_known_orientation_and_rate_come_back_within_one_lsb(chip, held):
    roll, gyro = math.radians(30), np.array([0.5, -1.25, 2.0])
    held.quat, held.gyro = axis_quat((1, 0, 0), roll), gyro
    with BNO055(chip.port) as imu:
        reading = imu.read()
    assert reading.quaternion.dtype == np.float32
    np.testing.assert_allclose(reading.quaternion, [math.cos(roll / 2), math.sin(roll / 2), 0, 0], atol=QUAT_LSB)
    np.testing.assert_allclose(reading.euler, [0, roll, 0], atol=RAD_LSB)  # heading, roll, pitch
    np.testing.assert_allclose(reading.gyro, gyro, atol=RAD_LSB)
    assert abs(np.linalg.norm(reading.quaternion) - 1) < 1e-6


def test_heading_and_pitch_are_decomposed_from_the_quaternion(chip, held):
    yaw, pitch = math.radians(-60), math.radians(20)  # heading reads 0..2π
    held.quat = quat_multiply(axis_quat((0, 0, 1), yaw), axis_quat((0, 1, 0), pitch))  # yaw, then pitch about new y
    with BNO055(chip.port) as imu:
        reading = imu.read()
    np.testing.assert_allclose(reading.euler, [yaw + 2 * math.pi, 0, pitch], atol=RAD_LSB)
    np.testing.assert_allclose(euler_from_quaternion(held.quat), [yaw + 2 * math.pi, 0, pitch], atol=1e-9)


def test_degree_units_scale_16_lsb_per_degree(chip, held):
    held.quat, held.gyro = axis_quat((1, 0, 0), math.radians(30)), np.array([0.0, 0.0, math.radians(90)])
    with BNO055(chip.port) as imu:
        imu.set_mode(0x00)
        imu.write_register(0x3B, b"\x00")  # degrees, dps
        imu.set_mode(0x0C)
        gyro = np.frombuffer(imu.read_register(0x14, 6), "<i2")
        euler = np.frombuffer(imu.read_register(0x1A, 6), "<i2")
    assert list(gyro) == [0, 0, 90 * 16] and list(euler) == [0, 30 * 16, 0]


def test_calibration_status_bits(chip):
    chip.calibration = {"sys": 1, "gyr": 3, "acc": 2, "mag": 0}
    with BNO055(chip.port) as imu:
        assert imu.read_register(0x35, 1) == bytes([0b01_11_10_00])
        assert imu.read().calibration == {"sys": 1, "gyr": 3, "acc": 2, "mag": 0}
        chip.calibration = {"sys": 3, "gyr": 3, "acc": 3, "mag": 3}
        assert imu.calibration() == {"sys": 3, "gyr": 3, "acc": 3, "mag": 3}


def test_config_mode_reads_zero_and_holds_unit_writes_back_in_fusion(chip, held):
    held.quat = axis_quat((1, 0, 0), 0.4)
    with BNO055(chip.port) as imu:
        imu.write_register(0x3B, b"\x00")  # outside CONFIG: acknowledged, not applied
        assert imu.read_register(0x3B, 1) == b"\x06"
        imu.set_mode(0x00)
        assert imu.read_register(0x14, 20) == bytes(20)
        assert imu.read_register(0x39, 1) == b"\x00"  # SYS_STATUS idle
        imu.set_mode(0x0C)
        assert imu.read_register(0x39, 1) == b"\x05"  # fusion running
        assert imu.read().euler[1] == pytest.approx(0.4, abs=RAD_LSB)
        with pytest.raises(ImuError, match=r"0x05 \(regmap write disabled\)") as err:
            imu.write_register(0x20, b"\x00\x01")  # QUA_DATA is read-only
        assert chip.port in str(err.value)


def test_overrun_answers_are_retried(chip, held):
    held.quat = axis_quat((0, 1, 0), 0.3)
    chip.faults.overrun_rate = 0.3
    with BNO055(chip.port, retries=8) as imu:
        readings = [imu.read() for _ in range(40)]
        assert imu.retried > 0
    assert chip.stats["overruns"] == imu.retried  # every EE 07 was retried, nothing else was
    assert all(abs(r.euler[2] - 0.3) <= RAD_LSB for r in readings)


def test_persistent_overrun_is_an_error_naming_the_port(chip):
    with BNO055(chip.port, retries=2) as imu:
        chip.faults.overrun_rate = 1.0
        with pytest.raises(ImuError, match="bus over run") as err:
            imu.read()
        assert chip.port in str(err.value) and "3 time(s)" in str(err.value)
        chip.faults.overrun_rate = 0.0
        imu.read()  # the chip is back


def test_a_silent_chip_is_an_error_naming_the_port(chip):
    chip.faults.silent = True
    imu = BNO055(chip.port, retries=1, timeout_s=0.05)
    with pytest.raises(ImuError, match="no answer") as err:
        imu.open()
    assert chip.port in str(err.value) and "0x00" in str(err.value)
    assert imu._serial is None  # the port was released


def test_a_missing_port_or_another_chip_is_named(chip, tmp_path):
    missing = str(tmp_path / "ttyUSB9")
    with pytest.raises(ImuError, match="cannot open") as err:
        BNO055(missing).open()
    assert missing in str(err.value)
    chip.mem[0x00] = 0x55
    with pytest.raises(ImuError, match="CHIP_ID reads 0x55, expected 0xA0") as err:
        BNO055(chip.port).open()
    assert chip.port in str(err.value)


# ----- on the PyBullet quadruped -----------------------------------------------------------------------------


def test_frame_helpers_rotate_world_vectors_into_the_body():
    q = axis_quat((0, 0, 1), math.pi / 2)  # body x along world y
    np.testing.assert_allclose(rotate_into(q, np.array([0.0, 1.0, 0.0])), [1, 0, 0], atol=1e-12)


def test_emulated_imu_on_the_pybullet_quadruped():
    cfg = load_config(ROOT / "hardware_configs" / "servo_quadruped.yaml")
    with PyBulletPlant(cfg) as plant:
        for i in range(len(plant.names)):
            plant.set_torque(i, True)
        plant.reset_pose([s.home for s in cfg.motors.servos])
        time.sleep(0.5)  # settle on its feet
        with EmulatedBNO055(pybullet_imu_source(plant)) as chip, BNO055(chip.port) as imu:
            standing = imu.read()
            assert abs(standing.euler[1]) < 0.05 and abs(standing.euler[2]) < 0.05  # roll, pitch: upright
            assert np.linalg.norm(standing.gyro) < 0.2

            roll, spin = math.radians(25), np.array([0.0, 0.0, 1.0])  # tilted, turning about world z
            position = plant.base_state()[0]
            q = axis_quat((1, 0, 0), roll)
            plant.set_base(position + [0.0, 0.0, 0.3], (*q[1:], q[0]), spin)
            tilted = imu.read()  # in the air: nothing to tip it for a while
            flipped_quat, flipped_gyro = pybullet_imu_source(plant, mount=axis_quat((1, 0, 0), math.pi))()
    assert tilted.euler[1] == pytest.approx(roll, abs=math.radians(2))
    assert abs(tilted.euler[2]) < math.radians(2)
    # body frame: world z seen from a body rolled by +25° about x is (0, sin 25°, cos 25°)
    np.testing.assert_allclose(tilted.gyro, [0, math.sin(roll), math.cos(roll)], atol=0.1)
    # a chip mounted upside down (rolled 180° on the base): its y and z axes point the other way
    np.testing.assert_allclose(flipped_gyro, [0, -math.sin(roll), -math.cos(roll)], atol=0.1)
    assert euler_from_quaternion(flipped_quat)[1] == pytest.approx(roll - math.pi, abs=math.radians(2))
    with pytest.raises(ValueError, match="mount"):
        pybullet_imu_source(plant, mount=(0, 0, 0))
