"""An emulated servo bus on a pseudo-terminal, byte for byte: the real driver runs against it unchanged.

`ServoEmulator` opens a pty and serves it from a thread. It parses instruction packets with the same
codec the driver uses and answers as real servos do: only at the baud the servo runs at (read back from
the pty, so a scan across baud rates is real), after the wire time of the request and the reply plus
the servo's Return_Delay_Time, one status per servo of a sync read in the order asked. Joint state
comes from a `Plant` (PyBullet in `sim/`, or the `KinematicPlant` here for fast tests).

Faults (`ServoEmulator.faults`) can be injected at any time from another thread: dropped and
corrupted replies, silent servos, error bits, a slow bus.

Choices where the manuals are silent or the emulator simplifies (the driver must not rely on them):
- a silent servo is disconnected: it neither hears nor answers (so its bus watchdog fires);
- Feetech status packets have no error bit for a refused write: a write to EEPROM with torque on or
  Lock=1 is acknowledged without error and not applied (read it back to check);
- on Torque_Enable=1 a servo drives to its Goal_Position register, which at power-on is the present
  position: a driver must write the goal it wants before enabling torque;
- Drive_Mode, velocity profiles and PID gains are stored but do not change the motion.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from robot.emulated.pty_device import PtyDevice, host_baud
from robot.servo.codec import Codec, CorruptPacket, Packet
from robot.servo.dynamixel import HARDWARE_ALERT
from robot.servo.protocols import codec_for
from robot.servo.tables import DYNAMIXEL_OPERATING_MODES, MODELS, Model, Register

log = logging.getLogger(__name__)

BITS_PER_BYTE = 10  # 8N1
SPIN_S = 0.002  # a wait for the wire shorter than this is spun, not slept: a sleeping thread wakes late on a busy host
WRITE_GIVE_UP_S = 1.0  # a host that does not read its port for this long loses the reply

# Dynamixel status error numbers the emulator produces
OK, RESULT_FAIL, INSTRUCTION_ERROR, CRC_ERROR, DATA_RANGE, DATA_LENGTH, DATA_LIMIT, ACCESS = range(8)
OVERLOAD = 1 << 5  # Hardware_Error_Status bit used when only the alert bit was injected
EXTENDED_RANGE = 1_048_575  # goal range of Dynamixel extended / current-based position modes
GOAL_REGISTERS = ("Goal_Position", "Goal_Velocity", "Goal_Current")


class Plant(Protocol):
    """Joint physics behind emulated servos; index i is the i-th servo given to the emulator."""

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions (rad), velocities (rad/s) and load in [-1, 1] of every joint."""
        ...

    def set_goal(self, index: int, angle: float) -> None: ...

    def set_torque(self, index: int, on: bool) -> None: ...

    def set_torque_limit(self, index: int, fraction: float) -> None: ...


class KinematicPlant:
    """Joints without dynamics, for fast tests: with torque on each moves toward its goal at up to
    `max_speed` rad/s; with torque off it stays where it is unless moved by hand (`move`)."""

    LOAD_SPAN = 0.5  # rad of goal error that reads as full load

    def __init__(self, n: int, max_speed: float = 6.0, initial: Sequence[float] | None = None) -> None:
        if n < 1:
            raise ValueError(f"a plant needs at least one joint, got n={n}")
        self.max_speed = float(max_speed)
        self.positions = np.zeros(n) if initial is None else np.array(initial, dtype=float)
        if self.positions.shape != (n,):
            raise ValueError(f"initial has {len(self.positions)} angles for {n} joints")
        self.goals = self.positions.copy()
        self.torque = np.zeros(n, dtype=bool)
        self.limits = np.ones(n)
        self._velocities = np.zeros(n)
        self._time = time.monotonic()
        self._lock = threading.Lock()

    def _advance(self) -> None:
        now = time.monotonic()
        dt = now - self._time
        if dt <= 0:
            return
        self._time = now
        reach = self.max_speed * dt
        step = np.where(self.torque, np.clip(self.goals - self.positions, -reach, reach), 0.0)
        self.positions += step
        self._velocities = step / dt

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            self._advance()
            error = np.clip((self.goals - self.positions) / self.LOAD_SPAN, -1.0, 1.0)
            load = np.where(self.torque, error * self.limits, 0.0)
            return self.positions.copy(), self._velocities.copy(), load

    def set_goal(self, index: int, angle: float) -> None:
        with self._lock:
            self._advance()
            self.goals[index] = float(angle)

    def set_torque(self, index: int, on: bool) -> None:
        with self._lock:
            self._advance()
            self.torque[index] = bool(on)

    def set_torque_limit(self, index: int, fraction: float) -> None:
        with self._lock:
            self.limits[index] = min(max(float(fraction), 0.0), 1.0)

    def move(self, index: int, angle: float) -> None:
        """Put joint `index` at `angle` by hand (a person backdriving it)."""
        with self._lock:
            self._advance()
            self.positions[index] = float(angle)


@dataclass
class EmulatedServo:
    """One servo on the emulated bus."""

    id: int
    model: str  # key of MODELS
    baud: int = 1_000_000
    zero_ticks: int = 2048  # raw tick reading at joint angle 0 (per-servo mounting offset)
    direction: int = 1  # +1/-1: raw ticks increase with the joint angle or against it


@dataclass
class Faults:
    """Faults to inject; mutable at any time from another thread.

    `error_bits` is the error byte a servo puts in every status. On Dynamixel, bit 7 (hardware alert)
    also latches Hardware_Error_Status: the bits in `hardware_error` for that id, else overload. A
    latched error that matches the servo's Shutdown mask turns its torque off until a reboot.
    """

    drop_rate: float = 0.0  # fraction of replies never sent
    corrupt_rate: float = 0.0  # fraction of replies with a wrong checksum/CRC
    silent: set[int] = field(default_factory=set)  # servo ids that stop answering (and hearing)
    error_bits: dict[int, int] = field(default_factory=dict)  # servo id -> error byte set in every status
    delay_s: float = 0.0  # extra delay before the replies to every instruction (a slow bus)
    hardware_error: dict[int, int] = field(default_factory=dict)  # Dynamixel: id -> Hardware_Error_Status bits


@dataclass
class _Reply:
    """A status packet waiting for its time on the wire; `after` runs once it was (or would have been) sent."""

    frame: bytes
    wire_s: float  # its own time on the wire plus the servo's return delay
    after: Callable[[], None] | None = None


class _Servo:
    """The state of one emulated servo: its control table bytes and what the table does not hold."""

    def __init__(self, index: int, spec: EmulatedServo, model: Model, codec: Codec) -> None:
        self.index = index
        self.spec = spec
        self.model = model
        self.codec = codec
        self.mem = bytearray(model.table_size)
        self.id = spec.id
        self.baud = spec.baud
        self.last_contact = time.monotonic()
        for name, value in model.defaults.items():
            self.set(name, value)
        self.set("ID", spec.id)
        self.set("Baud_Rate", model.baud_code(spec.baud))

    def get(self, name: str) -> int:
        reg = self.model.reg(name)
        return self.codec.decode(bytes(self.mem[reg.address:reg.end]), reg)

    def set(self, name: str, value: int) -> None:
        reg = self.model.reg(name)
        self.mem[reg.address:reg.end] = self.codec.encode(value, reg)

    def has(self, name: str) -> bool:
        return name in self.model.registers

    @property
    def dynamixel(self) -> bool:
        return self.model.protocol == "dynamixel"

    @property
    def torque(self) -> bool:
        return bool(self.get("Torque_Enable"))

    @property
    def return_delay_s(self) -> float:
        return self.get("Return_Delay_Time") * 2e-6

    def adopt(self) -> None:
        """ID and Baud_Rate writes take effect (after the status that acknowledged them)."""
        self.id = self.get("ID")
        self.baud = self.model.baud_codes.get(self.get("Baud_Rate"), self.baud)

    # ----- ticks <-> joint angles -------------------------------------------------------------

    def _offset_sign(self) -> int:
        # Dynamixel: present = actual + Homing_Offset; Feetech STS: present = actual - Homing_Offset
        return 1 if self.dynamixel else -1

    def ticks(self, angle: float) -> int:
        """Present_Position at joint `angle`, wrapped as the servo reports it."""
        per_rad = self.model.ticks_per_rev / (2 * math.pi)
        raw = self.spec.zero_ticks + self.spec.direction * round(angle * per_rad)
        value = raw + self._offset_sign() * self.get("Homing_Offset")
        if self.dynamixel and self.get("Operating_Mode") != 3:
            return (value + 2**31) % 2**32 - 2**31  # multi-turn modes: the int32 register wraps
        return value % self.model.ticks_per_rev

    def angle(self, goal: int) -> float:
        """The joint angle a Goal_Position value asks for."""
        raw = goal - self._offset_sign() * self.get("Homing_Offset")
        return self.spec.direction * (raw - self.spec.zero_ticks) * 2 * math.pi / self.model.ticks_per_rev

    def refresh(self, position: float, velocity: float, load: float) -> None:
        """Write the present values of the joint into the table before a read."""
        direction = self.spec.direction
        self.set("Present_Position", self.ticks(position))
        self.set("Present_Velocity", _clip(direction * velocity / self.model.velocity_unit,
                                           self.model.reg("Present_Velocity")))
        self.set(self.model.load_register, _clip(direction * load * self.model.load_max,
                                                  self.model.reg(self.model.load_register)))
        if self.model.load_register != "Present_Current":
            self.set("Present_Current", _clip(direction * load * self.model.current_max,
                                              self.model.reg("Present_Current")))
        self.set("Moving", int(abs(velocity) > 1e-3))


def _clip(value: float, reg: Register) -> int:
    """Round and saturate to what `reg` can hold."""
    bits = reg.sign_bit if reg.sign_bit is not None else 8 * reg.size - (1 if reg.signed else 0)
    top = (1 << bits) - 1
    low = -top - (1 if reg.sign_bit is None else 0) if reg.signed else 0
    return int(min(max(round(value), low), top))


class ServoEmulator(PtyDevice):
    """Emulated servos behind a pseudo-terminal: open `port` with pyserial and talk to them.

    `timing=True` delivers replies no earlier than a real bus would (wire time at the servo's baud,
    10 bits per byte, plus Return_Delay_Time); `timing=False` answers at once. `seed` seeds the
    dropped/corrupted reply draws, so a failing run can be repeated.
    """

    def __init__(self, protocol: str, servos: list[EmulatedServo], plant: Plant | None = None,
                 timing: bool = True, seed: int = 0) -> None:
        self.codec = codec_for(protocol)
        self.protocol = protocol
        self.timing = timing
        self.faults = Faults()
        self.plant: Plant = plant if plant is not None else KinematicPlant(len(servos))
        self.stats: dict[str, int] = dict.fromkeys(
            ("received", "answered", "dropped", "corrupted", "sync_reads", "sync_writes", "corrupt_received",
             "ignored", "wrong_baud", "watchdog_fired", "stale_dropped", "overflow", "internal_errors"), 0)
        self._servos = [_Servo(i, spec, _model(spec, protocol), self.codec) for i, spec in enumerate(servos)]
        _check_ids(servos)
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        super().__init__("servo-emulator")
        self._hold_initial_pose()

    def _hold_initial_pose(self) -> None:
        positions, _, _ = self.plant.state()
        for s in self._servos:
            s.set("Goal_Position", s.ticks(float(positions[s.index])))  # power-on: goal = present

    # ----- lifecycle ------------------------------------------------------------------------------

    # ----- inspection (for tests) ------------------------------------------------------------------

    def _servo(self, id: int) -> _Servo:
        for s in self._servos:
            if s.id == id:
                return s
        raise ValueError(f"servo emulator on {self.port}: no servo {id} (ids: {[s.id for s in self._servos]})")

    def register(self, id: int, name: str) -> int:
        """Current decoded value of register `name` of servo `id` (present values refreshed first)."""
        with self._lock:
            servo = self._servo(id)
            self._refresh([servo])
            return servo.get(name)

    def torque_enabled(self) -> dict[int, bool]:
        with self._lock:
            return {s.id: s.torque for s in self._servos}

    # ----- serving --------------------------------------------------------------------------------

    def _on_stale(self) -> None:
        self._count("stale_dropped")

    def _on_tick(self, now: float) -> None:
        with self._lock:
            self._tick(now)

    def _drain(self, buf: bytearray) -> None:
        """Answer every complete instruction in `buf`."""
        while not self._stop.is_set():
            before = len(buf)
            try:
                packet = self.codec.take(buf, status=False)
            except CorruptPacket as exc:
                self._reply_all(self._corrupt_request(exc), time.monotonic(), exc.consumed)
                continue
            if packet is None:
                return
            received = time.monotonic()
            with self._lock:
                self.stats["received"] += 1
                replies = self._handle(packet)
            self._reply_all(replies, received, before - len(buf))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _reply_all(self, replies: list[_Reply], received: float, request_bytes: int) -> None:
        """Send the statuses of one instruction together, once the last of them has crossed a real half-duplex
        bus (no byte comes earlier than it would): one sleep and one write per instruction, as a USB adapter
        hands the host what it gathered in one transfer. Sleeping once per status instead made a sync read of
        six servos six wake-ups on each side, each one late on a busy machine."""
        if not replies:
            return
        due = received + self.faults.delay_s
        if self.timing:
            baud = max(host_baud(self._master), 1)
            due += request_bytes * BITS_PER_BYTE / baud
            due += sum(r.wire_s + len(r.frame) * BITS_PER_BYTE / baud for r in replies)
        wait = due - time.monotonic()
        if wait > SPIN_S and self._stop.wait(wait - SPIN_S):
            return
        while time.monotonic() < due:  # at 1 Mbit/s the whole exchange is under a millisecond: never sleep for it
            pass
        self._put(b"".join(self._faulted(reply.frame) for reply in replies))
        for reply in replies:
            if reply.after is not None:
                with self._lock:
                    reply.after()

    def _faulted(self, frame: bytes) -> bytes:
        """The frame as the injected faults let it through: b"" when dropped, garbled when corrupted."""
        faults = self.faults
        if self._rng.random() < faults.drop_rate:
            self._count("dropped")
            return b""
        if self._rng.random() < faults.corrupt_rate:
            frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            self._count("corrupted")
        self._count("answered")
        return frame

    def _put(self, data: bytes) -> None:
        if not self._write_all(data, WRITE_GIVE_UP_S):
            self._count("overflow")

    # ----- instructions -----------------------------------------------------------------------------

    def _handle(self, packet: Packet) -> list[_Reply]:
        """Apply one instruction; return the statuses it makes servos send, in bus order."""
        baud = host_baud(self._master)
        present = [s for s in self._servos if s.id not in self.faults.silent]
        listening = [s for s in present if s.baud == baud]
        if packet.id == self.codec.BROADCAST:
            targets = listening
        else:
            targets = [s for s in listening if s.id == packet.id]
            if not targets:
                at_other_baud = any(s.id == packet.id for s in present)
                self.stats["wrong_baud" if at_other_baud else "ignored"] += 1
                return []
        now = time.monotonic()
        for s in targets:
            s.last_contact = now
        handlers: dict[int | None, Callable[[Packet, list[_Servo]], list[_Reply]]] = {
            self.codec.PING: self._ping, self.codec.READ: self._read, self.codec.WRITE: self._write_instruction,
            self.codec.SYNC_READ: self._sync_read, self.codec.SYNC_WRITE: self._sync_write,
        }
        if self.codec.REBOOT is not None:
            handlers[self.codec.REBOOT] = self._reboot
        handler = handlers.get(packet.code, self._unknown)
        return handler(packet, targets)

    def _status(self, s: _Servo, result: int, params: bytes = b"",
                after: Callable[[], None] | None = None) -> _Reply:
        frame = self.codec.status(s.id, self._error_byte(s, result), params)
        return _Reply(frame, s.return_delay_s, after)

    def _error_byte(self, s: _Servo, result: int) -> int:
        injected = self.faults.error_bits.get(s.id, 0)
        if not s.dynamixel:
            return injected & 0xFF  # Feetech status bits report hardware conditions only
        alert = HARDWARE_ALERT if s.get("Hardware_Error_Status") or injected & HARDWARE_ALERT else 0
        return alert | (result or injected & 0x7F)

    def _fields(self, params: bytes, n: int) -> tuple[list[int], bytes] | None:
        """`n` address/length fields at the start of `params`, and the bytes after them."""
        size = self.codec.addr_size
        if len(params) < n * size:
            return None
        values = [int.from_bytes(params[i * size:(i + 1) * size], "little") for i in range(n)]
        return values, params[n * size:]

    def _ping(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        replies = []
        for s in sorted(targets, key=lambda s: s.id):
            params = s.get("Model_Number").to_bytes(2, "little") + bytes([s.get("Firmware_Version")])
            replies.append(self._status(s, OK, params if s.dynamixel else b""))
        return replies

    def _read(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        if packet.id == self.codec.BROADCAST:
            return []  # nobody answers a broadcast read
        s = targets[0]
        parsed = self._fields(packet.params, 2)
        if parsed is None or parsed[1]:
            return [self._status(s, DATA_LENGTH)] if s.dynamixel else []
        (address, size), _ = parsed
        result, data = self._read_range(s, address, size)
        return [self._status(s, result, data)]

    def _read_range(self, s: _Servo, address: int, size: int) -> tuple[int, bytes]:
        end = address + size
        if s.dynamixel and size == 0:
            return DATA_LENGTH, b""
        if s.dynamixel and end > s.model.table_size:
            return ACCESS, b""
        self._refresh([s])
        data = bytes(s.mem[address:end])
        return OK, data + bytes(size - len(data))  # Feetech: bytes past the table read as 0

    def _refresh(self, servos: list[_Servo]) -> None:
        positions, velocities, loads = self.plant.state()
        for s in servos:
            s.refresh(float(positions[s.index]), float(velocities[s.index]), float(loads[s.index]))

    def _write_instruction(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        parsed = self._fields(packet.params, 1)
        if packet.id == self.codec.BROADCAST:
            for s in targets if parsed else []:
                self._write(s, parsed[0][0], parsed[1])
                s.adopt()
            return []
        s = targets[0]
        if parsed is None:
            return [self._status(s, DATA_LENGTH)] if s.dynamixel else []
        result = self._write(s, parsed[0][0], parsed[1])
        return [self._status(s, result, after=s.adopt)]  # a new ID or baud applies after this status

    def _sync_read(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        parsed = self._fields(packet.params, 2)
        if packet.id != self.codec.BROADCAST or parsed is None:
            return []
        (address, size), ids = parsed
        self.stats["sync_reads"] += 1
        by_id = {s.id: s for s in targets}
        replies = []
        for id in ids:
            s = by_id.get(id)
            if s is not None:
                result, data = self._read_range(s, address, size)
                replies.append(self._status(s, result, data))
        return replies

    def _sync_write(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        parsed = self._fields(packet.params, 2)
        if packet.id != self.codec.BROADCAST or parsed is None:
            return []
        (address, size), body = parsed
        if size == 0 or len(body) % (size + 1):
            self.stats["ignored"] += 1
            return []
        self.stats["sync_writes"] += 1
        by_id = {s.id: s for s in targets}
        for start in range(0, len(body), size + 1):
            s = by_id.get(body[start])
            if s is not None:
                self._write(s, address, body[start + 1:start + 1 + size])
                s.adopt()
        return []

    def _reboot(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        if packet.id == self.codec.BROADCAST:
            for s in targets:
                self._restart(s)
            return []
        s = targets[0]
        return [self._status(s, OK, after=lambda: self._restart(s))]

    def _unknown(self, packet: Packet, targets: list[_Servo]) -> list[_Reply]:
        self.stats["ignored"] += 1
        if packet.id == self.codec.BROADCAST or not targets[0].dynamixel:
            return []
        return [self._status(targets[0], INSTRUCTION_ERROR)]

    def _corrupt_request(self, exc: CorruptPacket) -> list[_Reply]:
        """A Dynamixel servo answers an instruction that fails its CRC with a CRC error; a Feetech one is silent."""
        with self._lock:
            self.stats["corrupt_received"] += 1
            baud = host_baud(self._master)
            for s in self._servos:
                if s.dynamixel and s.id == exc.id and s.baud == baud and s.id not in self.faults.silent:
                    return [self._status(s, CRC_ERROR)]
        return []

    # ----- the control table ------------------------------------------------------------------------

    def _write(self, s: _Servo, address: int, data: bytes) -> int:
        """Write `data` at `address` as the servo would; returns the Dynamixel result number (0 = done)."""
        end = address + len(data)
        if not data:
            return DATA_LENGTH
        if end > s.model.table_size:
            return ACCESS
        touched = [r for r in s.model.registers.values() if r.address < end and address < r.end]
        if any(r.readonly for r in touched):
            return ACCESS
        if any(r.eeprom for r in touched) and not (not s.torque and (s.dynamixel or s.get("Lock") == 0)):
            return ACCESS
        staged = bytearray(s.mem)
        staged[address:end] = data
        values = {r.name: s.codec.decode(bytes(staged[r.address:r.end]), r) for r in touched}
        result = self._check(s, values)
        if result == OK:
            s.mem[address:end] = data
            for name, value in values.items():
                self._apply(s, name, value)
        return result

    def _check(self, s: _Servo, values: dict[str, int]) -> int:
        """The error a servo reports for these new register values (0 = acceptable)."""
        if "ID" in values and not 0 <= values["ID"] <= 252:
            return DATA_RANGE
        if "Baud_Rate" in values and values["Baud_Rate"] not in s.model.baud_codes:
            return DATA_RANGE
        if not s.dynamixel:
            return OK
        if "Operating_Mode" in values and values["Operating_Mode"] not in DYNAMIXEL_OPERATING_MODES:
            return DATA_RANGE
        if s.get("Bus_Watchdog") == -1 and any(n in values for n in GOAL_REGISTERS):
            return DATA_RANGE  # goals are refused until Bus_Watchdog is written 0 (as the manual says)
        if "Goal_Position" in values and not _goal_allowed(s, values["Goal_Position"]):
            return DATA_LIMIT
        return OK

    def _apply(self, s: _Servo, name: str, value: int) -> None:
        """What writing `name` does beyond storing it."""
        if name == "Torque_Enable":
            self._torque(s, bool(value))
        elif name == "Goal_Position":
            if not s.dynamixel:
                value = _clamp_to_limits(s, value)
                s.set("Goal_Position", value)
            self.plant.set_goal(s.index, s.angle(value))
        elif name in (s.model.torque_limit_register, "Operating_Mode"):
            self._apply_torque_limit(s)
        elif name == "Bus_Watchdog":
            s.last_contact = time.monotonic()

    def _torque(self, s: _Servo, on: bool) -> None:
        if on and s.dynamixel and s.get("Hardware_Error_Status") & s.get("Shutdown"):
            on = False  # shut down by a hardware error: only a reboot brings torque back
        s.set("Torque_Enable", int(on))
        if on:
            self.plant.set_goal(s.index, s.angle(s.get("Goal_Position")))
            s.last_contact = time.monotonic()
        self.plant.set_torque(s.index, on)

    def _apply_torque_limit(self, s: _Servo) -> None:
        if s.dynamixel and s.get("Operating_Mode") not in (0, 5):
            fraction = 1.0  # Goal_Current limits torque only in current(-based position) mode
        else:
            fraction = abs(s.get(s.model.torque_limit_register)) / s.model.torque_limit_max
        self.plant.set_torque_limit(s.index, min(fraction, 1.0))

    def _restart(self, s: _Servo) -> None:
        """Dynamixel reboot: RAM back to factory values, hardware error cleared, torque off, goal = present."""
        for reg in s.model.registers.values():
            if not reg.eeprom and not reg.readonly:
                s.set(reg.name, s.model.defaults.get(reg.name, 0))
        s.set("Hardware_Error_Status", 0)
        self._torque(s, False)
        self._apply_torque_limit(s)
        positions, _, _ = self.plant.state()
        s.set("Goal_Position", s.ticks(float(positions[s.index])))

    # ----- time-driven behaviour -----------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        for s in self._servos:
            if s.dynamixel:
                self._latch_hardware_error(s)
                self._bus_watchdog(s, now)

    def _latch_hardware_error(self, s: _Servo) -> None:
        bits = self.faults.hardware_error.get(s.id, 0)
        if not bits and self.faults.error_bits.get(s.id, 0) & HARDWARE_ALERT:
            bits = OVERLOAD
        if bits:
            s.set("Hardware_Error_Status", s.get("Hardware_Error_Status") | bits)
        if s.torque and s.get("Hardware_Error_Status") & s.get("Shutdown"):
            self._torque(s, False)

    def _bus_watchdog(self, s: _Servo, now: float) -> None:
        """Bus_Watchdog 1..127: a servo with torque on that hears nothing for value*20 ms holds still."""
        limit = s.get("Bus_Watchdog")
        if not (1 <= limit <= 127 and s.torque and now - s.last_contact > limit * 0.02):
            return
        positions, _, _ = self.plant.state()
        angle = float(positions[s.index])
        self.plant.set_goal(s.index, angle)
        s.set("Goal_Position", s.ticks(angle))
        s.set("Bus_Watchdog", -1)
        self.stats["watchdog_fired"] += 1


def _goal_allowed(s: _Servo, goal: int) -> bool:
    mode = s.get("Operating_Mode")
    if mode == 3:
        return s.get("Min_Position_Limit") <= goal <= s.get("Max_Position_Limit")
    if mode in (4, 5):
        return abs(goal) <= EXTENDED_RANGE
    return True


def _clamp_to_limits(s: _Servo, goal: int) -> int:
    """Feetech servos clamp goals into their position limits (both 0 = no limits)."""
    low, high = s.get("Min_Position_Limit"), s.get("Max_Position_Limit")
    return min(max(goal, low), high) if high > low else goal


def _model(spec: EmulatedServo, protocol: str) -> Model:
    model = MODELS.get(spec.model)
    if model is None:
        raise ValueError(f"emulated servo {spec.id}: unknown model {spec.model!r} (known: {', '.join(MODELS)})")
    if model.protocol != protocol:
        raise ValueError(f"emulated servo {spec.id}: model {spec.model} speaks {model.protocol}, the bus {protocol}")
    if spec.direction not in (1, -1):
        raise ValueError(f"emulated servo {spec.id}: direction must be 1 or -1, got {spec.direction}")
    model.baud_code(spec.baud)  # ValueError lists the rates it supports
    return model


def _check_ids(servos: list[EmulatedServo]) -> None:
    ids = [s.id for s in servos]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"emulated servos share ids {dupes}: every servo on a bus needs its own id")
    bad = [i for i in ids if not 0 <= i <= 252]
    if bad:
        raise ValueError(f"emulated servo ids {bad} are outside 0..252")
