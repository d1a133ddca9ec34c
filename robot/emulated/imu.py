"""An emulated BNO055 on a pseudo-terminal, speaking the UART protocol byte for byte, so `robot.sensors.imu.BNO055`
runs against it unchanged.

The orientation and angular rate come from `source()` (a PyBullet body in `sim.emulation.imu_plant`, or None for a
chip lying still and level). The register file holds page 0 with the chip's ids and power-on values; in a
fusion mode the data registers are filled from the source at each read, in the units UNIT_SEL asks for.

Faults (`EmulatedBNO055.faults`) can be changed at any time: `overrun_rate` answers that fraction of the
requests with `EE 07` (bus over run) without doing them, `silent` makes the chip answer nothing.

Choices where the datasheet is silent or the emulator simplifies (the driver must not rely on them):
- Euler angles use the aerospace Z-Y-X decomposition (heading = yaw in 0..2π, roll about x in ±π, pitch
  about y in ±π/2); the real chip's sign and range conventions depend on UNIT_SEL bit 7. Use the quaternion.
- after an OPR_MODE write the chip behaves as in CONFIG mode (data registers read 0) for `SWITCH_S`;
- UNIT_SEL, AXIS_MAP_* and the offset registers take writes only in CONFIG mode; elsewhere a write to them
  is acknowledged and not applied (read back to check);
- a request with an unknown operation byte is answered `EE 06`; SYS_TRIGGER is stored, never acted on;
- linear acceleration is taken as 0: ACC_DATA = GRV_DATA = gravity in the chip's frame, LIA_DATA = 0; the
  non-fusion modes fill ACC_DATA and GYR_DATA whichever sensors they name.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from robot.emulated.pty_device import PtyDevice, host_baud
from robot.sensors.imu import world_up_in_body

Source = Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (quaternion w, x, y, z; gyro rad/s in the chip frame)

BAUD = 115200
POLL_S = 0.005
SWITCH_S = 0.02  # time an OPR_MODE change takes
GRAVITY = 9.80665
WRITE_OK, WRITE_FAIL, INVALID_ADDRESS, WRITE_DISABLED = 0x01, 0x03, 0x04, 0x05
WRONG_START, OVERRUN, MAX_LENGTH, MIN_LENGTH, CHAR_TIMEOUT = 0x06, 0x07, 0x08, 0x09, 0x0A
PAGE_SIZE, MAX_LEN = 0x80, 128

ACC_DATA, GYR_DATA, EUL_DATA, QUA_DATA, LIA_DATA, GRV_DATA, TEMP = 0x08, 0x14, 0x1A, 0x20, 0x28, 0x2E, 0x34
CALIB_STAT, SYS_STATUS, SYS_ERR, UNIT_SEL, OPR_MODE = 0x35, 0x39, 0x3A, 0x3B, 0x3D
POWER_ON = {0x00: 0xA0, 0x01: 0xFB, 0x02: 0x32, 0x03: 0x0F, 0x04: 0x11, 0x05: 0x03, 0x06: 0x15,  # ids, SW rev
            0x36: 0x0F, 0x41: 0x24, TEMP: 25}  # ST_RESULT all passed, AXIS_MAP_CONFIG default, 25 °C
WRITABLE = {0x07, UNIT_SEL, OPR_MODE, 0x3E, 0x3F, 0x40, 0x41, 0x42, *range(0x55, 0x6B)}
CONFIG_ONLY = {UNIT_SEL, 0x41, 0x42, *range(0x55, 0x6B)}
FUSION_MODES = range(0x08, 0x0D)  # IMU, COMPASS, M4G, NDOF_FMC_OFF, NDOF: orientation outputs exist


@dataclass
class ImuFaults:
    """Faults to inject; mutable at any time from another thread."""

    overrun_rate: float = 0.0  # fraction of requests answered EE 07 and not done
    silent: bool = False  # the chip hears nothing and answers nothing


def euler_from_quaternion(q: np.ndarray) -> np.ndarray:
    """(heading, roll, pitch) rad of the unit quaternion (w, x, y, z), Z-Y-X decomposition."""
    w, x, y, z = (float(v) for v in q)
    roll = math.atan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = math.asin(max(-1.0, min(1.0, 2 * (w * y - z * x))))
    yaw = math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.array([yaw % (2 * math.pi), roll, pitch])


def gravity_in_chip(q: np.ndarray) -> np.ndarray:
    """World gravity reaction (0, 0, +g: what an accelerometer at rest reads) in the chip's frame, m/s²."""
    return GRAVITY * world_up_in_body(q)


def _words(values: np.ndarray, scale: float) -> bytes:
    ints = np.clip(np.round(np.asarray(values, dtype=np.float64) * scale), -32768, 32767)
    return ints.astype("<i2").tobytes()


class EmulatedBNO055(PtyDevice):
    """A BNO055 behind a pseudo-terminal: open `port` at 115200 baud with pyserial and talk to it."""

    def __init__(self, source: Source | None = None, seed: int = 0) -> None:
        self.source = source
        self.faults = ImuFaults()
        self.calibration = {"sys": 3, "gyr": 3, "acc": 3, "mag": 3}  # settable: 0..3 each
        self.stats = dict.fromkeys(("received", "answered", "overruns", "wrong_baud", "errors",
                                    "internal_errors"), 0)
        self.requests: deque[bytes] = deque(maxlen=256)  # the latest requests as received (for tests)
        self.mem = bytearray(PAGE_SIZE)
        for reg, value in POWER_ON.items():
            self.mem[reg] = value
        self._switched = time.monotonic()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        super().__init__("bno055-emulator")

    # ----- lifecycle --------------------------------------------------------------------------------------------
    @property
    def mode(self) -> int:
        """The operating mode in effect (CONFIG while a switch is under way)."""
        with self._lock:
            if time.monotonic() - self._switched < SWITCH_S:
                return 0
            return self.mem[OPR_MODE] & 0x0F

    # ----- serving ----------------------------------------------------------------------------------------------
    def _hears(self) -> bool:
        return not self.faults.silent

    def _on_stale(self) -> None:
        if not self.faults.silent:
            self._put(_error(CHAR_TIMEOUT))

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    def _drain(self, buf: bytearray) -> None:
        """Answer every complete request at the front of `buf`."""
        while buf:
            if host_baud(self._master) != BAUD:
                self.stats["wrong_baud"] += 1  # at another baud the chip sees noise: nothing it can parse
                buf.clear()
                return
            answer, used = self._parse(buf)
            if not used:
                return
            self.requests.append(bytes(buf[:used]))
            del buf[:used]
            self.stats["received"] += 1
            self._put(answer)

    def _parse(self, buf: bytearray) -> tuple[bytes, int]:
        """(answer, bytes consumed) for the request at the front of `buf`; (b"", 0) while it is incomplete."""
        if buf[0] != 0xAA:
            skip = buf.find(0xAA)
            return _error(WRONG_START), skip if skip > 0 else len(buf)
        if len(buf) < 4:
            return b"", 0
        op, reg, n = buf[1], buf[2], buf[3]
        if n == 0:
            return _error(MIN_LENGTH), 4
        if n > MAX_LEN:
            return _error(MAX_LENGTH), 4
        if op == 0x01:
            return self._answer(lambda: self._read(reg, n)), 4
        if op == 0x00:
            if len(buf) < 4 + n:
                return b"", 0
            data = bytes(buf[4:4 + n])
            return self._answer(lambda: self._write(reg, data)), 4 + n
        return _error(WRONG_START), 4

    def _answer(self, do: Callable[[], bytes]) -> bytes:
        if self._rng.random() < self.faults.overrun_rate:
            self.stats["overruns"] += 1
            return _error(OVERRUN)
        with self._lock:
            return do()

    def _put(self, data: bytes) -> None:
        if data[0] == 0xEE and data[1] != WRITE_OK:
            self.stats["errors"] += 1
        self._write_all(data)
        self.stats["answered"] += 1

    # ----- the register file ------------------------------------------------------------------------------------
    def _read(self, reg: int, n: int) -> bytes:
        if reg + n > PAGE_SIZE:
            return _error(INVALID_ADDRESS)
        self._refresh()
        return bytes([0xBB, n]) + bytes(self.mem[reg:reg + n])

    def _write(self, reg: int, data: bytes) -> bytes:
        end = reg + len(data)
        if end > PAGE_SIZE:
            return _error(INVALID_ADDRESS)
        if any(r not in WRITABLE for r in range(reg, end)):
            return _error(WRITE_DISABLED)
        if OPR_MODE in range(reg, end) and data[OPR_MODE - reg] & 0x0F > 0x0C:
            return _error(WRITE_FAIL)
        configuring = self.mode == 0
        for r, value in zip(range(reg, end), data):
            if r in CONFIG_ONLY and not configuring:
                continue
            if r == OPR_MODE and value != self.mem[OPR_MODE]:
                self._switched = time.monotonic()
            self.mem[r] = value
        return _error(WRITE_OK)

    def _refresh(self) -> None:
        """Fill the status and data registers for the present mode and units."""
        c = self.calibration
        self.mem[CALIB_STAT] = (c["sys"] & 3) << 6 | (c["gyr"] & 3) << 4 | (c["acc"] & 3) << 2 | c["mag"] & 3
        mode = self.mode
        self.mem[SYS_STATUS] = 5 if mode in FUSION_MODES else 0  # 5: fusion running, 0: idle
        self.mem[SYS_ERR] = 0
        if mode == 0:
            self.mem[ACC_DATA:TEMP] = bytes(TEMP - ACC_DATA)
            return
        quat, gyro = self._sample()
        self._fill(quat, gyro, fusion=mode in FUSION_MODES)

    def _sample(self) -> tuple[np.ndarray, np.ndarray]:
        if self.source is None:
            return np.array([1.0, 0.0, 0.0, 0.0]), np.zeros(3)
        quat, gyro = self.source()
        quat = np.asarray(quat, dtype=np.float64)
        return quat / np.linalg.norm(quat), np.asarray(gyro, dtype=np.float64)

    def _fill(self, quat: np.ndarray, gyro: np.ndarray, fusion: bool) -> None:
        units = self.mem[UNIT_SEL]
        gyro_scale = 900.0 if units & 0x02 else 16.0 * 180 / math.pi
        euler_scale = 900.0 if units & 0x04 else 16.0 * 180 / math.pi
        acc_scale = 1000.0 / GRAVITY if units & 0x01 else 100.0  # mg or m/s²
        gravity = gravity_in_chip(quat)
        self.mem[ACC_DATA:ACC_DATA + 6] = _words(gravity, acc_scale)
        self.mem[GYR_DATA:GYR_DATA + 6] = _words(gyro, gyro_scale)
        if not fusion:
            self.mem[EUL_DATA:TEMP] = bytes(TEMP - EUL_DATA)
            return
        self.mem[EUL_DATA:EUL_DATA + 6] = _words(euler_from_quaternion(quat), euler_scale)
        self.mem[QUA_DATA:QUA_DATA + 8] = _words(quat, float(1 << 14))
        self.mem[LIA_DATA:LIA_DATA + 6] = bytes(6)
        self.mem[GRV_DATA:GRV_DATA + 6] = _words(gravity, acc_scale)


def _error(status: int) -> bytes:
    return bytes([0xEE, status])
