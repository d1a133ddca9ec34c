"""Bosch BNO055 absolute-orientation IMU over its UART interface (datasheet section 4.7).

The wire protocol is tiny: a write is `AA 00 reg len data...`, answered `EE 01` (or `EE status`); a read is
`AA 01 reg len`, answered `BB len data...` (or `EE status`). The chip drops requests now and then with
`EE 07` (bus over run) when its fusion firmware is busy, so every transaction is retried a few times before
the driver gives up with an `ImuError` that names the port.

`BNO055.open()` checks the chip id, sets radian units in CONFIG mode, switches to NDOF fusion and reads
both back (fail loudly if not honoured). `read()` takes gyro, Euler angles, quaternion and calibration
status in one burst read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import serial

from core.interface import RobotError

START, WRITE, READ, READ_OK, STATUS = 0xAA, 0x00, 0x01, 0xBB, 0xEE
WRITE_OK = 0x01
STATUS_NAMES = {
    0x03: "write fail", 0x04: "regmap invalid address", 0x05: "regmap write disabled", 0x06: "wrong start byte",
    0x07: "bus over run", 0x08: "max length", 0x09: "min length", 0x0A: "receive character timeout",
}
TRANSIENT = {0x06, 0x07, 0x0A}  # statuses a retry can cure: the request was garbled or the chip was busy
MAX_LENGTH = 128  # bytes one UART transaction may carry

# page 0 registers
CHIP_ID, GYR_DATA, CALIB_STAT, SYS_STATUS, SYS_ERR = 0x00, 0x14, 0x35, 0x39, 0x3A
UNIT_SEL, OPR_MODE, PWR_MODE, SYS_TRIGGER = 0x3B, 0x3D, 0x3E, 0x3F
BNO055_ID = 0xA0
CONFIG_MODE, NDOF_MODE = 0x00, 0x0C
UNIT_GYRO_RAD, UNIT_EULER_RAD = 0x02, 0x04
RADIAN_UNITS = UNIT_GYRO_RAD | UNIT_EULER_RAD  # m/s², rad/s, rad, °C, Windows orientation
RAD_LSB = 900.0  # LSB per rad (Euler) and per rad/s (gyro) in radian units
QUAT_LSB = float(1 << 14)
SWITCH_S = 0.025  # the datasheet asks for 19 ms (to CONFIG) / 7 ms (from CONFIG); a little margin
BURST = (GYR_DATA, CALIB_STAT + 1 - GYR_DATA)  # gyro, Euler, quaternion, LIA, GRV, temp, calibration


class ImuError(RobotError):
    """The IMU could not be reached or refused a request; the message names the port and the register."""


@dataclass(frozen=True)
class ImuReading:
    quaternion: np.ndarray  # (4,) w, x, y, z float32, unit norm: the orientation of the chip in its world frame
    euler: np.ndarray  # (3,) heading, roll, pitch rad, as the chip reports them
    gyro: np.ndarray  # (3,) rad/s about the chip's x, y, z axes
    calibration: dict[str, int]  # sys, gyr, acc, mag: 0 (uncalibrated) .. 3 (fully calibrated)
    time: float  # time.monotonic() when the answer arrived


def world_up_in_body(quaternion_wxyz: Sequence[float] | np.ndarray) -> np.ndarray:
    """World up (+z) in the body's axes, from its orientation quaternion (w, x, y, z), float64.

    The third row of the body-to-world rotation: its z component is how upright the body stands (1 upright,
    0 on its side, -1 upside down), its negation is gravity's direction as the body feels it. Every
    uprightness and gravity figure of the robot side is read from here, so the formula lives once.
    """
    w, x, y, z = (float(v) for v in quaternion_wxyz)
    return np.array([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)])


def read_request(reg: int, n: int) -> bytes:
    """The bytes asking the chip for `n` registers from `reg`."""
    _check_range(reg, n)
    return bytes([START, READ, reg, n])


def write_request(reg: int, data: bytes) -> bytes:
    """The bytes writing `data` to the registers from `reg`."""
    _check_range(reg, len(data))
    return bytes([START, WRITE, reg, len(data)]) + bytes(data)


def _check_range(reg: int, n: int) -> None:
    if not 0 <= reg <= 0x7F:
        raise ValueError(f"BNO055 register 0x{reg:02X} is outside page 0x00..0x7F")
    if not 1 <= n <= MAX_LENGTH:
        raise ValueError(f"BNO055 transaction length {n} is outside 1..{MAX_LENGTH}")


def calibration_from(stat: int) -> dict[str, int]:
    """CALIB_STAT split into its four 2-bit fields."""
    return {"sys": stat >> 6 & 3, "gyr": stat >> 4 & 3, "acc": stat >> 2 & 3, "mag": stat & 3}


def decode_burst(data: bytes, at: float) -> ImuReading:
    """An `ImuReading` from the registers GYR_DATA..CALIB_STAT, in radian units."""
    words = np.frombuffer(data[:20], dtype="<i2").astype(np.float64)
    quat = words[6:10] / QUAT_LSB
    norm = np.linalg.norm(quat)
    quat = quat / norm if norm > 0 else np.array([1.0, 0.0, 0.0, 0.0])
    return ImuReading(
        quaternion=quat.astype(np.float32),
        euler=(words[3:6] / RAD_LSB).astype(np.float32),
        gyro=(words[0:3] / RAD_LSB).astype(np.float32),
        calibration=calibration_from(data[CALIB_STAT - GYR_DATA]),
        time=at,
    )


class _Retry(Exception):
    """One attempt failed in a way a retry can cure."""


class BNO055:
    """A BNO055 on a serial port (115200 8N1). Use as a context manager, or `open()` / `close()`."""

    def __init__(self, port: str, baud: int = 115200, retries: int = 3, timeout_s: float = 0.05) -> None:
        if retries < 0:
            raise ValueError(f"BNO055 on {port}: retries must be >= 0, got {retries}")
        self.port = port
        self.baud = baud
        self.retries = retries
        self.timeout_s = timeout_s
        self.retried = 0  # transactions repeated since open (a health figure)
        self._serial: serial.Serial | None = None

    # ----- lifetime -------------------------------------------------------------------------------------------
    def open(self) -> BNO055:
        """Open the port, check the chip id and start NDOF fusion with radian units."""
        try:
            self._serial = serial.Serial(self.port, self.baud, timeout=self.timeout_s, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            raise ImuError(f"BNO055 on {self.port}: cannot open the port: {exc}") from exc
        try:
            self._check_chip()
            self._configure()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the port. Safe to call repeatedly."""
        if self._serial is not None:
            self._serial.close()
            self._serial = None

    def __enter__(self) -> BNO055:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_chip(self) -> None:
        chip = self.read_register(CHIP_ID, 1)[0]
        if chip != BNO055_ID:
            raise ImuError(f"BNO055 on {self.port}: CHIP_ID reads 0x{chip:02X}, expected 0x{BNO055_ID:02X}; "
                           "is another device on this port?")

    def _configure(self) -> None:
        self.set_mode(CONFIG_MODE)
        self.write_register(UNIT_SEL, bytes([RADIAN_UNITS]))
        self.set_mode(NDOF_MODE)
        units = self.read_register(UNIT_SEL, 1)[0]
        if units & RADIAN_UNITS != RADIAN_UNITS:
            raise ImuError(f"BNO055 on {self.port}: UNIT_SEL reads 0x{units:02X} after writing "
                           f"0x{RADIAN_UNITS:02X}; the chip did not take radian units")

    def set_mode(self, mode: int) -> None:
        """Switch OPR_MODE, wait out the switch and check the chip took it."""
        self.write_register(OPR_MODE, bytes([mode]))
        time.sleep(SWITCH_S)
        got = self.read_register(OPR_MODE, 1)[0] & 0x0F
        if got != mode:
            raise ImuError(f"BNO055 on {self.port}: OPR_MODE reads 0x{got:02X} after writing 0x{mode:02X}")

    # ----- data -----------------------------------------------------------------------------------------------
    def read(self) -> ImuReading:
        """Gyro, Euler angles, quaternion and calibration status, from one burst read."""
        data = self.read_register(*BURST)
        return decode_burst(data, time.monotonic())

    def calibration(self) -> dict[str, int]:
        """CALIB_STAT: sys, gyr, acc, mag, each 0..3 (3 = calibrated)."""
        return calibration_from(self.read_register(CALIB_STAT, 1)[0])

    # ----- transactions ---------------------------------------------------------------------------------------
    def read_register(self, reg: int, n: int) -> bytes:
        """`n` bytes from register `reg` onward."""
        request = read_request(reg, n)
        return self._transact(request, lambda: self._read_answer(n), f"read of {n} byte(s) at 0x{reg:02X}")

    def write_register(self, reg: int, data: bytes) -> None:
        """Write `data` to the registers from `reg` onward."""
        request = write_request(reg, data)
        self._transact(request, self._write_answer, f"write of {len(data)} byte(s) at 0x{reg:02X}")

    def _transact(self, request: bytes, answer: Callable[[], bytes], what: str) -> bytes:
        port = self._port()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
            port.reset_input_buffer()
            port.write(request)
            try:
                return answer()
            except _Retry as exc:
                last = str(exc)
        raise ImuError(f"BNO055 on {self.port}: {what} failed {self.retries + 1} time(s); last: {last}")

    def _port(self) -> serial.Serial:
        if self._serial is None:
            raise ImuError(f"BNO055 on {self.port}: not open (call open() or use it as a context manager)")
        return self._serial

    def _take(self, n: int) -> bytes:
        data = self._port().read(n)
        if len(data) < n:
            got = f"got {data.hex(' ')}" if data else "no answer"
            raise _Retry(f"{got} within {self.timeout_s} s (expected {n} more byte(s))")
        return data

    def _status(self, status: int) -> None:
        name = STATUS_NAMES.get(status, "unknown status")
        if status in TRANSIENT:
            raise _Retry(f"status 0x{status:02X} ({name})")
        raise ImuError(f"BNO055 on {self.port}: the chip answered status 0x{status:02X} ({name})")

    def _read_answer(self, n: int) -> bytes:
        head = self._take(2)
        if head[0] == STATUS:
            self._status(head[1])
        if head[0] != READ_OK or head[1] != n:
            raise _Retry(f"bad answer header {head.hex(' ')} to a read of {n} byte(s)")
        return self._take(n)

    def _write_answer(self) -> bytes:
        head = self._take(2)
        if head[0] != STATUS:
            raise _Retry(f"bad answer header {head.hex(' ')} to a write")
        if head[1] != WRITE_OK:
            self._status(head[1])
        return b""
