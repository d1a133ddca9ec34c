"""The serial servo bus driver: one class for both protocols.

All request/response logic lives here (timeouts, retries, sync reads, fault reporting); the protocol
codec (`robot.servo.protocols.codec_for`) only frames bytes and the control tables
(`robot.servo.tables`) only name registers, so the emulated bus shares every byte with this driver.

Timeouts are computed per request from the baud rate and the packet lengths, plus a margin for the
USB adapter and the OS (`default_margin_s`: wider on a pseudo-terminal, whose "servos" are an emulator
process that must be scheduled before it answers). FTDI-based adapters hold received bytes for their
latency timer (16 ms by default) before passing them on: set it to 1 ms, for example
`echo 1 | sudo tee /sys/bus/usb-serial/devices/ttyUSB0/latency_timer`, or every reply arrives after
its deadline.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import serial

from robot.servo.codec import Codec, CorruptPacket, Packet
from robot.servo.dynamixel import HARDWARE_ALERT, hardware_error_names
from robot.servo.errors import BusCorrupt, BusTimeout, MotorConfigError, MotorError, ServoFault
from robot.servo.protocols import codec_for
from robot.servo.tables import MODELS, Model, Register, model_for

log = logging.getLogger(__name__)

BITS_PER_BYTE = 10  # 8N1: a start bit, 8 data bits, a stop bit
PING_PARAMS = {"dynamixel": 3, "feetech": 0}  # Dynamixel's ping status carries model number + firmware
# A model whose table locates Model_Number / Firmware_Version before the servo's own model is known.
PROBE_MODEL = {"dynamixel": "xl430-w250", "feetech": "sts3215"}
SCAN_STRAGGLERS_S = 0.05  # after a sweep, late replies still count
IDENTIFY_MARGIN_S = 0.05  # reading a found servo's model needs no hurry
RETURN_DELAY_S = 0.0005  # a servo waits this long before its status (Dynamixel X factory Return_Delay_Time)
USB_MARGIN_S = 0.01  # a USB adapter's transfer and the OS waking this process (FTDI latency timer at 1 ms)
# A pseudo-terminal's replies come from an emulator process (`reverie-sim emulate`) that must itself be scheduled
# to read the request and again to answer; on a busy machine each wake-up can take ten milliseconds or more.
PTY_MARGIN_S = 0.03
PTY_HINT = ("an emulated bus (pseudo-terminal): is `reverie-sim emulate` still running? Replies that come late "
            "mean this computer is too busy to run the emulator and the robot at once")


def is_pseudo_terminal(port: str) -> bool:
    """Whether `port` is a pseudo-terminal (/dev/pts/N, or a link to one, or spy://ONE?...): an emulated or
    bridged bus."""
    if port.startswith("spy://"):  # pyserial's logging wrapper around a port
        port = port.removeprefix("spy://").split("?", 1)[0]
    return os.path.realpath(port).startswith("/dev/pts/")


def default_margin_s(port: str) -> float:
    """The timeout margin for a port whose config leaves it open (motors.timeout_margin_ms: null)."""
    return PTY_MARGIN_S if is_pseudo_terminal(port) else USB_MARGIN_S


@dataclass
class BusStats:
    """Counters of one bus, for logs and tests. `requests` counts instructions sent (sync writes and
    retries too); `timeouts` counts servos that did not answer one request in time; `corrupt` counts
    garbled status packets."""

    requests: int = 0
    expected: int = 0  # statuses awaited, over every try: with `unanswered`, the bus's measured reply loss
    unanswered: dict[int, int] = field(default_factory=dict)  # servo id -> statuses it did not send in time
    late_bytes: int = 0  # bytes that arrived after their request's deadline (dropped before the next request)
    reads: int = 0
    writes: int = 0
    retries: int = 0
    timeouts: int = 0
    corrupt: int = 0
    faults: int = 0


class MotorBus:
    """One serial servo bus. All protocol logic lives here; the codec holds the framing.

    `models` maps servo id -> model name (a key of `tables.MODELS`); ids not in it are identified by a
    ping the first time they are used. Every request/response holds one lock, so the safety watchdog
    may write from another thread while the control loop reads.
    """

    def __init__(self, port: str, protocol: str, baud: int = 1_000_000, models: dict[int, str] | None = None,
                 retries: int = 2, timeout_margin_s: float | None = None) -> None:
        self.port = port
        self.protocol = protocol
        self.baud = int(baud)
        self.codec: Codec = codec_for(protocol)
        self.models: dict[int, str] = dict(models or {})
        self.retries = int(retries)
        self.timeout_margin_s = default_margin_s(port) if timeout_margin_s is None else float(timeout_margin_s)
        self.stats = BusStats()
        self._serial: Any = None
        self._lock = threading.RLock()
        # (request, time, kind): a request whose replies did not all come; they may still arrive until that time.
        # `kind` names requests whose replies are interchangeable (sync reads of one span): a late reply to one
        # is as good an answer to the next, which then need not wait for it.
        self._unanswered: tuple[bytes, float, tuple | None] | None = None
        for id, name in self.models.items():
            self._model_named(name, id)  # fail early on a bad map

    # ----- port -----------------------------------------------------------------------------------

    def open(self) -> MotorBus:
        """Open the port exclusively (a second process on one bus garbles both)."""
        with self._lock:
            if self._serial is None:
                self._serial = open_port(self.port, self.baud)
        return self

    def close(self) -> None:
        with self._lock:
            if self._serial is not None:
                try:
                    self._serial.close()
                finally:
                    self._serial = None

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def __enter__(self) -> MotorBus:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def input_waiting(self) -> int:
        """Bytes received and not yet read: a late reply sits here until the next request discards it."""
        with self._lock:
            return int(self._port_open().in_waiting)

    def set_baud(self, baud: int) -> None:
        """Change the host side's baud (the servos keep theirs: see `write('Baud_Rate', ...)`)."""
        with self._lock:
            if self._serial is not None:
                try:
                    self._serial.baudrate = int(baud)
                except (ValueError, serial.SerialException) as exc:
                    raise MotorError(f"port {self.port}: cannot set baud {baud}: {exc}") from None
            self.baud = int(baud)

    def timeout_s(self, request_bytes: int, reply_bytes: int, replies: int = 1) -> float:
        """How long to wait for `replies` statuses: the packets' wire time at this baud, each servo's
        return delay (factory settings), plus the margin."""
        wire = (request_bytes + reply_bytes) * BITS_PER_BYTE / self.baud
        return wire + replies * RETURN_DELAY_S + self.timeout_margin_s

    # ----- models and registers -------------------------------------------------------------------

    def _model_named(self, name: str, id: int) -> Model:
        model = MODELS.get(name)
        if model is None:
            raise MotorConfigError(f"servo {id}: unknown model {name!r} (known: {sorted(MODELS)})")
        if model.protocol != self.protocol:
            raise MotorConfigError(f"servo {id}: model {name!r} speaks {model.protocol}, this bus {self.protocol}")
        return model

    def model(self, id: int) -> Model:
        """The model of servo `id`: from the models map, else learned from a ping (then remembered)."""
        name = self.models.get(id)
        if name is not None:
            return self._model_named(name, id)
        number = next((n for n in (self.ping(id) for _ in range(self.retries + 1)) if n is not None), None)
        if number is None:
            raise BusTimeout(self.port, [id], "a ping (needed to learn its model)", self.retries + 1,
                             f"{self.protocol} at {self.baud} bit/s")
        model = model_for(self.protocol, number)
        if model is None:
            raise MotorConfigError(f"servo {id} on {self.port}: unknown {self.protocol} model number {number}")
        self.models[id] = model.name
        return model

    def _register(self, model: Model, name: str, id: int) -> Register:
        try:
            return model.reg(name)
        except KeyError as exc:
            raise MotorConfigError(f"servo {id} ({model.name}): {exc}") from None

    def _span(self, names: list[str], ids: list[int]) -> tuple[int, int, dict[str, Register]]:
        """(address, length, registers) of the contiguous span covering `names`; every servo must agree."""
        if not names:
            raise MotorConfigError("sync access needs at least one register name")
        first: dict[str, Register] | None = None
        for id in ids:
            model = self.model(id)
            regs = {n: self._register(model, n, id) for n in names}
            layout = {n: (r.address, r.size) for n, r in regs.items()}
            if first is None:
                first, first_id = regs, id
            elif layout != {n: (r.address, r.size) for n, r in first.items()}:
                raise MotorConfigError(f"servos {first_id} and {id} place {names} at different addresses; "
                                       "one sync instruction cannot cover both")
        assert first is not None
        start = min(r.address for r in first.values())
        end = max(r.address + r.size for r in first.values())
        return start, end - start, first

    def _encode(self, value: int, reg: Register, id: int) -> bytes:
        try:
            return self.codec.encode(int(value), reg)
        except (ValueError, OverflowError) as exc:
            raise MotorConfigError(f"servo {id}: value {value} does not fit {reg.name} "
                                   f"({reg.size} bytes{', signed' if reg.signed else ''}): {exc}") from None

    # ----- requests -------------------------------------------------------------------------------

    def _port_open(self) -> Any:
        if self._serial is None:
            raise MotorError(f"bus on {self.port} is not open (call open() or use it as a context manager)")
        return self._serial

    def _is_retry(self, packet: bytes, kind: tuple | None) -> bool:
        """Whether `packet` may take a late reply to the last unanswered request as its own."""
        last = self._unanswered
        return last is not None and (last[0] == packet or (kind is not None and last[2] == kind))

    def _straggler_wait(self, packet: bytes, kind: tuple | None) -> float:
        """Seconds `packet` must wait for late replies to another request to land (so they are dropped)."""
        if self._unanswered is None or self._is_retry(packet, kind):
            return 0.0
        return max(0.0, self._unanswered[1] - time.monotonic())

    def _send(self, packet: bytes, flush_input: bool = True, kind: tuple | None = None) -> bool:
        """Write one instruction; True if it repeats the last one that went unanswered (a retry)."""
        port = self._port_open()
        retry = self._is_retry(packet, kind)
        if flush_input:
            # A late reply to another request could pass for this one's: give it time to land, then drop it.
            # (A retry of the same request may take the late reply as its own.)
            time.sleep(self._straggler_wait(packet, kind))
        try:
            if flush_input:
                self._unanswered = None
                self.stats.late_bytes += int(port.in_waiting)  # replies that came after their deadline
                port.reset_input_buffer()
            port.write(packet)
        except serial.SerialException as exc:
            raise MotorError(f"port {self.port}: write failed: {exc}") from None
        self.stats.requests += 1
        return retry

    def _wait_readable(self, port: Any, remaining: float) -> None:
        try:
            fd = port.fileno()
        except (AttributeError, OSError, ValueError, serial.SerialException):
            fd = None
        if fd is None:
            time.sleep(min(remaining, 0.0005))
            return
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready and not port.in_waiting:
            time.sleep(min(remaining, 0.0005))  # readable but empty: the other end hung up; don't spin

    def _pump(self, buf: bytearray, deadline: float) -> bool:
        """Wait (until `deadline` at most) for bytes and append them to `buf`; False once time is up."""
        port = self._port_open()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._wait_readable(port, remaining)
        self._take_waiting(port, buf)
        return True

    def _take_waiting(self, port: Any, buf: bytearray) -> int:
        """Append what the port holds now to `buf` (no waiting); the number of bytes."""
        try:
            n = port.in_waiting
            if n:
                buf += port.read(n)
        except (serial.SerialException, OSError) as exc:
            raise MotorError(f"port {self.port}: read failed: {exc}") from None
        return n

    def _packets(self, buf: bytearray, bad: list[int | None]) -> Iterable[Packet]:
        """Complete status packets in `buf`; corrupt ones are counted into `bad` (their id, when known)."""
        while True:
            try:
                packet = self.codec.take(buf, status=True)
            except CorruptPacket as exc:
                self.stats.corrupt += 1
                bad.append(exc.id)
                continue
            if packet is None:
                return
            yield packet

    def _receive(self, ids: Iterable[int], deadline: float) -> tuple[dict[int, Packet], list[int | None]]:
        """Status packets from `ids` until each has answered or the deadline passes; others are ignored."""
        wanted = set(ids)
        got: dict[int, Packet] = {}
        bad: list[int | None] = []
        buf = bytearray()
        final = False
        while True:
            for packet in self._packets(buf, bad):
                if packet.id in wanted and packet.id not in got:
                    got[packet.id] = packet
                else:
                    log.debug("bus %s: ignored a status from servo %d", self.port, packet.id)
            if len(got) == len(wanted) or final:
                return got, bad
            if not self._pump(buf, deadline):
                # The wait is over; one last look costs no time. On a busy machine this process is often scheduled
                # late, after the replies came: they count, rather than being dropped as missing.
                final = True
                if not self._take_waiting(self._port_open(), buf):
                    return got, bad

    def _transact(self, packet: bytes, ids: list[int], reply_params: int, deadline: float | None = None,
                  kind: tuple | None = None, last: bool = False) -> tuple[dict[int, Packet], list[int | None]]:
        """Send one instruction and collect the status of each of `ids` (one lock around both), waiting no
        later than `deadline` (time.monotonic()) when one is given; the `last` try under a deadline waits for
        the whole of it (giving up earlier would only lose a reply that is late, not missing)."""
        with self._lock:
            retry = self._send(packet, kind=kind)
            reply = len(ids) * self.codec.wire_bytes(reply_params, True)
            end = time.monotonic() + self.timeout_s(len(packet), reply, len(ids))
            if deadline is not None:
                end = deadline if last else min(end, deadline)
            got, bad = self._receive(ids, end)
            self.stats.expected += len(ids)
            for id in ids:
                if id not in got:
                    self.stats.unanswered[id] = self.stats.unanswered.get(id, 0) + 1
            if len(got) < len(ids) or retry:  # after a retry, the reply to one of the tries may still come
                self._unanswered = (packet, time.monotonic() + self.timeout_margin_s, kind)
            return got, bad

    def _request(self, id: int, packet: bytes, reply_params: int, what: str, retries: int,
                 accept: Iterable[int] = ()) -> Packet:
        """One instruction to one servo, resent up to `retries` times until a well-formed status arrives.
        `accept`: other ids whose status also counts (a servo answers a change of its ID from the new one)."""
        ids = [id, *[a for a in accept if a != id]]
        bad: list[int | None] = []  # over every try: one garbled reply makes the failure "corrupt"
        for attempt in range(retries + 1):
            if attempt:
                self.stats.retries += 1
            got, garbled = self._transact(packet, ids, reply_params)
            bad += garbled
            if not got:
                self.stats.timeouts += 1
            for i in ids:
                if i in got and (len(got[i].params) == reply_params or got[i].code):
                    return got[i]  # an error status may come without data: the caller reports its fault
                if i in got:
                    self.stats.corrupt += 1
                    bad.append(i)
        raise self._lost([id], bad, what, retries + 1)

    def _lost(self, ids: list[int], bad: list[int | None], what: str, attempts: int) -> MotorError:
        """The error for servos that gave no valid reply: corrupt if their replies were garbled, else timeout."""
        garbled = [i for i in ids if i in bad]
        if garbled or None in bad:
            others = f"no valid reply from servos {ids} after {attempts} tries; " if len(ids) > 1 else ""
            return BusCorrupt(self.port, garbled[0] if garbled else None, what,
                              f"{others}noise, a baud mismatch or two servos sharing an id?")
        if is_pseudo_terminal(self.port):
            return BusTimeout(self.port, ids, what, attempts, f"{self.protocol} at {self.baud} bit/s; {PTY_HINT}")
        return BusTimeout(self.port, ids, what, attempts, f"{self.protocol} at {self.baud} bit/s; check power, "
                          "wiring, id and baud; FTDI adapters need their latency timer at 1 ms")

    def _check(self, packet: Packet, what: str, reg: Register | None = None) -> None:
        if packet.code:
            self.stats.faults += 1
            raise _fault({packet.id: self._fault_names(packet.id, packet.code)}, what, self.port, reg)

    def _fault_names(self, id: int, code: int) -> list[str]:
        """The status error bits by name; a Dynamixel 'hardware alert' is looked up in Hardware_Error_Status."""
        names = self.codec.error_names(code)
        if self.protocol == "dynamixel" and code & HARDWARE_ALERT:
            try:
                status = self._read_reg(self._register(self.model(id), "Hardware_Error_Status", id), id, check=False)
            except MotorError:
                return names
            names += hardware_error_names(status)
        return names

    # ----- public operations ----------------------------------------------------------------------

    def ping(self, id: int) -> int | None:
        """The servo's model number, or None when nothing answers (the ping is not retried: used to probe).
        Feetech pings carry no model number: it is read after a ping that was answered."""
        with self._lock:
            got, _ = self._transact(self.codec.ping(id), [id], PING_PARAMS[self.protocol])
            packet = got.get(id)
            if packet is None:
                return None
            if self.protocol == "dynamixel" and len(packet.params) >= 2:
                return int.from_bytes(packet.params[:2], "little")
            model = MODELS[self.models.get(id, PROBE_MODEL[self.protocol])]
            try:
                return self._read_reg(self._register(model, "Model_Number", id), id, check=False)
            except (BusTimeout, BusCorrupt):
                return None

    def _read_reg(self, reg: Register, id: int, check: bool = True) -> int:
        """`check=False` still decodes a value that came with error bits (a Dynamixel hardware alert)."""
        what = f"a read of {reg.name}"
        with self._lock:
            self.stats.reads += 1
            packet = self._request(id, self.codec.read(id, reg.address, reg.size), reg.size, what, self.retries)
            if check or len(packet.params) != reg.size:
                self._check(packet, what)  # (no register: the EEPROM hint is about writes)
            return self.codec.decode(packet.params, reg)

    def read(self, name: str, id: int, check: bool = True) -> int:
        """Register `name` of servo `id` (signed registers decoded with the protocol's sign convention).
        `check=False` returns the value even when the reply carries error bits (a servo in alarm)."""
        with self._lock:
            return self._read_reg(self._register(self.model(id), name, id), id, check)

    def write(self, name: str, id: int, value: int) -> None:
        """Write register `name` of servo `id` and wait for its status; ServoFault if it reports an error."""
        with self._lock:
            reg = self._register(self.model(id), name, id)
            if reg.readonly:
                raise MotorConfigError(f"servo {id}: register {name} is read-only")
            data = self._encode(value, reg, id)
            self.stats.writes += 1
            # After an ID change the status may come from the new id; accept either.
            accept = [int(value)] if name == "ID" else []
            what = f"a write of {name}={value}"
            packet = self._request(id, self.codec.write(id, reg.address, data), 0, what, self.retries, accept)
            self._check(packet, what, reg)

    def sync_read(self, names: list[str], ids: list[int], deadline: float | None = None) -> dict[str, dict[int, int]]:
        """Registers `names` of every servo in `ids` with one sync read instruction covering their span.

        Servos that do not answer are asked again (only them) up to `retries` times; after that
        BusTimeout (or BusCorrupt) names the missing ids. Statuses with error bits raise ServoFault once
        every status of the read has been parsed, so the error names every faulty servo.
        With a `deadline` (time.monotonic()) every try, its wait for late replies included, ends by then: a
        control loop's read cannot overrun its period; what is unanswered by then is missing.
        """
        ids = list(ids)
        if not ids:
            return {n: {} for n in names}
        with self._lock:
            start, length, regs = self._span(names, ids)
            self.stats.reads += 1
            out, faults, pending, bad, tries = self._sync_read_tries(start, length, regs, ids, deadline)
            if faults:
                self.stats.faults += len(faults)
                missing = f"; no reply from servos {pending}" if pending else ""
                named = {id: self._fault_names(id, code) for id, code in faults.items()}
                raise _fault(named, f"a sync read of {names}{missing}", self.port)
            if pending:
                late = "" if tries == self.retries + 1 else " in the time it had"
                raise self._lost(pending, bad, f"a sync read of {names}{late}", max(tries, 1))
            return out

    def _sync_read_tries(self, start: int, length: int, regs: dict[str, Register], ids: list[int],
                         deadline: float | None = None) -> tuple[dict[str, dict[int, int]], dict[int, int], list[int],
                                                                 list[int | None], int]:
        """(values, error bytes by id, ids still unanswered, ids of garbled replies, tries made) after every try
        that fits before `deadline`."""
        out: dict[str, dict[int, int]] = {n: {} for n in regs}
        faults: dict[int, int] = {}
        bad: list[int | None] = []
        pending = list(ids)
        # Under a deadline, replies to sync reads of this span are interchangeable (a late one is as fresh as the
        # retry's would be): a retry need not wait for it. Without one, every try waits as any other request does.
        kind = ("sync_read", start, length) if deadline is not None else None
        tries = 0
        for attempt in range(self.retries + 1):
            packet = self.codec.sync_read(start, length, pending)
            if deadline is not None and time.monotonic() + self._straggler_wait(packet, kind) >= deadline:
                break  # no time left for this try (or for late replies to another request to land first)
            if attempt:
                self.stats.retries += 1
            tries += 1
            got, garbled = self._transact(packet, pending, length, deadline, kind, last=attempt == self.retries)
            bad += garbled
            self.stats.timeouts += len(set(pending) - set(got))
            for id, packet in got.items():
                if packet.code:
                    faults[id] = packet.code
                if len(packet.params) != length:
                    if not packet.code:  # an error status may come without data; anything else is garbled
                        self.stats.corrupt += 1
                        bad.append(id)
                    continue
                for n, reg in regs.items():
                    offset = reg.address - start
                    out[n][id] = self.codec.decode(packet.params[offset:offset + reg.size], reg)
            pending = [i for i in pending if i not in faults and i not in out[next(iter(regs))]]
            if not pending:
                break
        return out, faults, pending, bad, tries

    def sync_write(self, name: str, values: dict[int, int]) -> None:
        """Register `name` of several servos in one instruction. No reply comes, so it is never retried."""
        if not values:
            return
        ids = list(values)
        start, length, regs = self._span([name], ids)
        data = {id: self._encode(v, regs[name], id) for id, v in values.items()}
        with self._lock:
            self._send(self.codec.sync_write(start, length, data), flush_input=False)
        self.stats.writes += 1

    def reboot(self, id: int) -> None:
        """Restart a Dynamixel servo (the recovery from a hardware error; torque comes back off)."""
        if self.codec.REBOOT is None:
            raise MotorError(f"servo {id}: {self.protocol} servos have no reboot instruction; power-cycle them")
        self._request(id, self.codec.instruction(id, self.codec.REBOOT), 0, "a reboot", 0)

    def scan(self, ids: Iterable[int] = range(253),
             progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """Every servo that answers a ping at the current baud: {id, model, model_number, firmware, protocol,
        baud}. `progress(n)` is called as ids are probed."""
        with self._lock:
            found = self._sweep(list(ids), progress)
            margin, self.timeout_margin_s = self.timeout_margin_s, max(self.timeout_margin_s, IDENTIFY_MARGIN_S)
            try:
                return [s for s in (self._identify(id) for id in sorted(found)) if s is not None]
            finally:
                self.timeout_margin_s = margin

    def _sweep(self, ids: list[int], progress: Callable[[int], None] | None) -> set[int]:
        """Ping each id in turn. Input is not flushed between pings, so a reply that comes after its own
        window still counts (a short window then only costs time, never a servo). Only ping-shaped
        statuses of ids already pinged count: a late reply to an earlier request is not a servo."""
        found: set[int] = set()
        pinged: set[int] = set()
        bad: list[int | None] = []
        buf = bytearray()
        params = PING_PARAMS[self.protocol]
        reply = self.codec.wire_bytes(params, True)

        def take() -> None:
            found.update(p.id for p in self._packets(buf, bad) if p.id in pinged and len(p.params) == params)

        with self._lock:
            time.sleep(SCAN_STRAGGLERS_S)  # replies to requests before the sweep land now, and are dropped
            self._port_open().reset_input_buffer()
            for id in ids:
                packet = self.codec.ping(id)
                pinged.add(id)
                self._send(packet, flush_input=False)
                deadline = time.monotonic() + self.timeout_s(len(packet), reply)
                while id not in found and self._pump(buf, deadline):
                    take()
                if progress:
                    progress(1)
            deadline = time.monotonic() + SCAN_STRAGGLERS_S
            while self._pump(buf, deadline):
                take()
        return found

    def _identify(self, id: int) -> dict[str, Any] | None:
        """Model and firmware of a servo the sweep found; None (and a warning) if it stopped answering."""
        number = next((n for n in (self.ping(id) for _ in range(self.retries + 1)) if n is not None), None)
        model = model_for(self.protocol, number) if number is not None else None
        table = model or MODELS[PROBE_MODEL[self.protocol]]
        try:
            if number is None:
                raise BusTimeout(self.port, [id], "a ping", self.retries + 1)
            firmware = self._read_reg(self._register(table, "Firmware_Version", id), id, check=False)
        except (BusTimeout, BusCorrupt) as exc:  # a glitch, or a late reply to an earlier request
            log.warning("scan of %s at %d bit/s: servo %d answered a ping once, then not (%s); skipped",
                        self.port, self.baud, id, exc)
            return None
        return {"id": id, "model": model.name if model else "unknown", "model_number": number,
                "firmware": firmware, "protocol": self.protocol, "baud": self.baud}


def _fault(faults: dict[int, list[str]], what: str, port: str, reg: Register | None = None) -> ServoFault:
    """One ServoFault for every faulty servo of a reply: the first is its `id`/`faults`, the others are named in
    its message; `servo_faults` maps every faulty id to its fault names."""
    first, *others = sorted(faults)
    also = "; ".join(f"servo {id} reports {', '.join(faults[id]) or 'an error'}" for id in others)
    if also:
        what = f"{what} (also {also})"
    if reg is not None and reg.eeprom:
        what = f"{what} ({reg.name} is in EEPROM: write it with torque off)"
    exc = ServoFault(port, first, faults[first], what)
    exc.servo_faults = {id: list(names) for id, names in faults.items()}
    return exc


def open_port(port: str, baud: int) -> Any:
    """A pyserial port (a device path or a URL such as spy://PORT?file=log), opened exclusively and
    non-blocking (reads wait on deadlines of their own)."""
    url = "://" in port
    try:
        try:
            return serial.serial_for_url(port, baud, timeout=0, exclusive=True)
        except (TypeError, ValueError) as exc:
            if not url or "exclusive" not in str(exc):
                raise
            log.warning("port %s: its URL handler cannot lock the port exclusively (%s); opening it shared",
                        port, exc)
            return serial.serial_for_url(port, baud, timeout=0)
    except serial.SerialException as exc:
        raise _port_error(port, exc) from None
    except (ValueError, OSError) as exc:
        raise MotorError(f"port {port}: cannot open it at {baud} bit/s: {exc}") from None


def _port_error(port: str, exc: serial.SerialException) -> MotorError:
    code = exc.errno if isinstance(exc.errno, int) else None
    if code in (errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in str(exc):
        return MotorError(f"port {port} is in use: another process holds it open (another reverie-robot, a "
                          "calibration, a serial monitor?); close it first")
    if code == errno.ENOENT:
        return MotorError(f"port {port} does not exist: is the bus adapter plugged in? Stable names are listed "
                          "by `ls /dev/serial/by-id/`")
    if code == errno.EACCES:
        return MotorError(f"port {port}: permission denied (add your user to the dialout group, then log in again)")
    return MotorError(f"port {port}: cannot open it: {exc}")
