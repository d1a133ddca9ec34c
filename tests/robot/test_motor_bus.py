"""The bus driver against the emulated servo bus on a real pseudo-terminal, both protocols.

Every test talks through pyserial to `ServoEmulator`, which parses and answers with the same codec
as real servos would, at the baud of the port; faults (dropped, corrupt, late replies, error bits,
silent servos) are injected in the emulator, never mocked in the driver.
"""

from __future__ import annotations

import math
import os
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from robot.emulated.servo_bus import EmulatedServo, KinematicPlant, ServoEmulator
from robot.servo.bus import PTY_MARGIN_S, USB_MARGIN_S, MotorBus
from robot.servo.errors import BusCorrupt, BusTimeout, MotorConfigError, MotorError, ServoFault
from robot.servo.tables import MODELS

PROTOCOLS = ("dynamixel", "feetech")
MODEL = {"dynamixel": "xl430-w250", "feetech": "sts3215"}
MARGIN = 0.05  # generous: the emulator shares two busy cores with other tests
PATIENT = 0.5  # where nothing is meant to go missing: only a real loss would wait this long


def servos(protocol: str, n: int, baud: int = 1_000_000) -> list[EmulatedServo]:
    return [EmulatedServo(i + 1, MODEL[protocol], baud=baud, zero_ticks=1900 + 37 * i) for i in range(n)]


@contextmanager
def emulated(protocol: str, n: int = 6, plant: KinematicPlant | None = None, baud: int = 1_000_000,
             retries: int = 2, margin: float = MARGIN, seed: int = 0) -> Iterator[tuple[ServoEmulator, MotorBus]]:
    specs = servos(protocol, n, baud)
    with ServoEmulator(protocol, specs, plant or KinematicPlant(n), seed=seed) as emu, \
            MotorBus(emu.port, protocol, baud, models={s.id: s.model for s in specs}, retries=retries,
                     timeout_margin_s=margin) as bus:
        yield emu, bus


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ping_read_write_round_trips(protocol: str) -> None:
    plant = KinematicPlant(6, initial=[0.1 * i for i in range(6)])
    with emulated(protocol, plant=plant, margin=PATIENT) as (emu, bus):
        number = MODELS[MODEL[protocol]].model_number
        assert [bus.ping(i) for i in range(1, 7)] == [number] * 6
        assert bus.ping(42) is None  # nothing there: None, not an error
        assert bus.read("ID", 3) == 3
        assert bus.read("Present_Position", 4) == emu.register(4, "Present_Position") == 1900 + 37 * 3 + round(
            0.3 * 4096 / (2 * math.pi))
        bus.write("Goal_Position", 2, 2100)
        assert emu.register(2, "Goal_Position") == 2100
        bus.write("Torque_Enable", 5, 1)
        assert emu.torque_enabled()[5] and not emu.torque_enabled()[4]
        assert bus.stats.timeouts == 0 and bus.stats.retries == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_models_are_learned_from_a_ping(protocol: str) -> None:
    with ServoEmulator(protocol, servos(protocol, 2)) as emu, MotorBus(emu.port, protocol) as bus:
        assert bus.read("ID", 2) == 2
        assert bus.models == {2: MODEL[protocol]}
        with pytest.raises(BusTimeout, match="servo 9 did not answer a ping .*3 tries"):
            bus.read("ID", 9)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_register_and_unfit_value_are_config_errors(protocol: str) -> None:
    with emulated(protocol, n=1) as (_, bus):
        with pytest.raises(MotorConfigError, match="servo 1 .*'Nope'"):
            bus.read("Nope", 1)
        with pytest.raises(MotorConfigError, match="servo 1: value 70000 does not fit ID"):
            bus.write("ID", 1, 70000)
        with pytest.raises(MotorConfigError, match="read-only"):
            bus.write("Present_Position", 1, 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("n", [6, 12])
def test_sync_read_positions_and_velocities_in_one_instruction(protocol: str, n: int) -> None:
    plant = KinematicPlant(n, initial=[0.05 * i - 0.3 for i in range(n)])
    with emulated(protocol, n=n, plant=plant, margin=PATIENT) as (emu, bus):
        ids = list(range(1, n + 1))
        before_emu, before_bus = dict(emu.stats), bus.stats.requests
        values = bus.sync_read(["Present_Velocity", "Present_Position"], ids)
        assert emu.stats["sync_reads"] - before_emu["sync_reads"] == 1
        assert emu.stats["received"] - before_emu["received"] == 1  # one instruction on the wire
        assert bus.stats.requests - before_bus == 1
        assert values["Present_Position"] == {i: emu.register(i, "Present_Position") for i in ids}
        assert values["Present_Velocity"] == dict.fromkeys(ids, 0)
        assert len(set(values["Present_Position"].values())) == n


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_write_moves_the_plant(protocol: str) -> None:
    plant = KinematicPlant(3)
    with emulated(protocol, n=3, plant=plant) as (emu, bus):
        ticks_per_rad = 4096 / (2 * math.pi)
        targets = {1: 0.4, 2: -0.3, 3: 0.2}
        goals = {i: 1900 + 37 * (i - 1) + round(a * ticks_per_rad) for i, a in targets.items()}
        bus.sync_write("Goal_Position", goals)
        bus.sync_write("Torque_Enable", {1: 1, 2: 1, 3: 1})
        want = [targets[i] for i in (1, 2, 3)]
        assert wait_for(lambda: max(abs(p - w) for p, w in zip(plant.state()[0], want)) < 2e-3)
        assert {i: emu.register(i, "Goal_Position") for i in goals} == goals
        assert emu.stats["sync_writes"] == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_negative_velocity_and_signed_offsets(protocol: str) -> None:
    plant = KinematicPlant(2, max_speed=0.5, initial=[1.0, 1.0])
    model = MODELS[MODEL[protocol]]
    with emulated(protocol, n=2, plant=plant) as (emu, bus):
        bus.write("Goal_Position", 1, 0)  # far below: the joint moves down at max_speed for seconds
        bus.write("Torque_Enable", 1, 1)
        time.sleep(0.1)
        velocity = bus.sync_read(["Present_Velocity"], [1, 2])["Present_Velocity"]
        assert velocity[2] == 0
        assert velocity[1] < 0 and abs(velocity[1] * model.velocity_unit + 0.5) < 0.03
        bus.write("Torque_Enable", 1, 0)
        if protocol == "feetech":
            bus.write("Lock", 2, 0)  # EEPROM writes need the lock open on Feetech
        bus.write("Homing_Offset", 2, -100)
        assert bus.read("Homing_Offset", 2) == emu.register(2, "Homing_Offset") == -100


def test_negative_positions_dynamixel_extended_mode() -> None:
    plant = KinematicPlant(1, initial=[0.0])
    with ServoEmulator("dynamixel", [EmulatedServo(1, "xm430-w350", zero_ticks=100)], plant) as emu, \
            MotorBus(emu.port, "dynamixel", models={1: "xm430-w350"}, timeout_margin_s=MARGIN) as bus:
        bus.write("Operating_Mode", 1, 4)  # extended position: the register counts past 0 into negatives
        plant.move(0, -0.5)
        expected = 100 - round(0.5 * 4096 / (2 * math.pi))
        assert bus.read("Present_Position", 1) == emu.register(1, "Present_Position") == expected < 0
        assert bus.sync_read(["Present_Position"], [1])["Present_Position"] == {1: expected}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dropped_replies_are_retried(protocol: str) -> None:
    with emulated(protocol, n=6, retries=10, seed=3) as (emu, bus):  # 11 tries: a loss is ~0.3**11 unlikely
        emu.faults.drop_rate = 0.3
        for _ in range(15):
            values = bus.sync_read(["Present_Position"], list(range(1, 7)))["Present_Position"]
            assert values == {i: 1900 + 37 * (i - 1) for i in range(1, 7)}
            assert bus.read("ID", 4) == 4
        assert emu.stats["dropped"] > 0
        assert bus.stats.retries > 0 and bus.stats.timeouts > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_silent_servo_is_named_after_the_retries(protocol: str) -> None:
    with emulated(protocol, n=6, retries=2) as (emu, bus):
        emu.faults.silent = {4}
        before = emu.stats["sync_reads"]
        with pytest.raises(BusTimeout) as info:
            bus.sync_read(["Present_Position", "Present_Velocity"], list(range(1, 7)))
        assert info.value.ids == [4]
        assert "servo 4 did not answer" in str(info.value) and emu.port in str(info.value)
        assert wait_for(lambda: emu.stats["sync_reads"] - before == 3)  # the first try and two retries
        assert bus.stats.retries == 2 and bus.stats.timeouts >= 3
        with pytest.raises(BusTimeout, match="servo 4"):
            bus.read("Present_Position", 4)
        assert bus.ping(4) is None
        emu.faults.silent = set()
        assert bus.read("ID", 4) == 4  # it comes back: the bus is not stuck


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_corrupt_replies_are_retried_then_reported(protocol: str) -> None:
    with emulated(protocol, n=6, retries=8, seed=1) as (emu, bus):
        emu.faults.corrupt_rate = 0.2
        for _ in range(10):
            assert bus.sync_read(["Present_Position"], [1, 2, 3, 4, 5, 6])["Present_Position"][6] == 1900 + 37 * 5
        assert bus.stats.corrupt > 0 and bus.stats.retries > 0
        emu.faults.corrupt_rate = 1.0
        corrupt = bus.stats.corrupt
        with pytest.raises(BusCorrupt) as info:
            bus.read("Present_Position", 2)
        assert info.value.id == 2 and "corrupt reply from servo 2" in str(info.value)
        assert 0 < bus.stats.corrupt - corrupt <= 9  # every try that came back in time
        with pytest.raises(BusCorrupt, match="servos \\[1, 2, 3\\]"):
            bus.sync_read(["Present_Position"], [1, 2, 3])


def test_feetech_error_bits_name_every_faulty_servo() -> None:
    with emulated("feetech", n=6) as (emu, bus):
        emu.faults.error_bits = {2: 0x04, 5: 0x20}
        with pytest.raises(ServoFault) as info:
            bus.sync_read(["Present_Position"], list(range(1, 7)))
        fault = info.value
        assert fault.id == 2 and fault.faults == ["overheating"]
        assert fault.servo_faults == {2: ["overheating"], 5: ["overload"]}
        assert "servo 2 reports overheating" in str(fault) and "servo 5 reports overload" in str(fault)
        with pytest.raises(ServoFault, match="servo 5 reports overload"):
            bus.write("Goal_Position", 5, 2000)
        emu.faults.error_bits = {}
        assert bus.read("ID", 5) == 5


def test_dynamixel_hardware_alert_names_the_hardware_error_and_reboot_clears_it() -> None:
    with emulated("dynamixel", n=3) as (emu, bus):
        emu.faults.error_bits = {3: 0x80}
        with pytest.raises(ServoFault) as info:
            bus.read("Present_Position", 3)
        assert info.value.id == 3 and info.value.faults == ["hardware alert", "overload"]
        emu.faults.error_bits = {}
        with pytest.raises(ServoFault, match="servo 3 reports hardware alert, overload"):
            bus.sync_read(["Present_Position"], [1, 2, 3])  # latched until a reboot
        bus.reboot(3)
        assert bus.sync_read(["Present_Position"], [1, 2, 3])["Present_Position"][3] == 1900 + 74


def test_feetech_has_no_reboot() -> None:
    with emulated("feetech", n=1) as (_, bus), pytest.raises(MotorError, match="servo 1: feetech .* power-cycle"):
        bus.reboot(1)


def test_eeprom_write_with_torque_on_names_the_cause() -> None:
    with emulated("dynamixel", n=1) as (_, bus):
        bus.write("Torque_Enable", 1, 1)
        with pytest.raises(ServoFault, match="servo 1 reports access error .*EEPROM: write it with torque off"):
            bus.write("Operating_Mode", 1, 4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_bus_within_and_over_the_timeout(protocol: str) -> None:
    with emulated(protocol, n=2, retries=1, margin=PATIENT) as (emu, bus):
        emu.faults.delay_s = 0.1  # well within the margin
        assert bus.read("ID", 2) == 2
        assert bus.stats.timeouts == 0
        bus.timeout_margin_s = 0.02
        emu.faults.delay_s = 0.25  # every reply lands after its deadline
        answered = emu.stats["answered"]
        with pytest.raises(BusTimeout) as info:
            bus.read("Firmware_Version", 1)
        assert info.value.ids == [1] and info.value.tries == 2
        assert wait_for(lambda: emu.stats["answered"] - answered == 2)  # both late replies were sent
        reply = bus.codec.wire_bytes(1, True)
        assert wait_for(lambda: bus.input_waiting() == 2 * reply)  # and wait in the host's input buffer
        emu.faults.delay_s = 0.0
        bus.timeout_margin_s = PATIENT
        assert bus.read("ID", 1) == 1  # not the stale Firmware_Version reply (same size, other value)
        assert bus.stats.late_bytes == 2 * reply  # the late replies were counted as they were dropped


def test_a_pseudo_terminal_gets_the_wider_margin_and_its_own_advice(tmp_path: Path) -> None:
    """A pseudo-terminal's "servos" are an emulator process that must be scheduled to read a request and again to
    answer it: by default the bus waits PTY_MARGIN_S there (a link to the pty too), USB_MARGIN_S on an adapter, and
    a margin given is kept. A servo missing on a pty is not blamed on wiring or an FTDI latency timer."""
    with ServoEmulator("feetech", servos("feetech", 1)) as emu:
        link = tmp_path / "usb-emulated-if00"
        link.symlink_to(emu.port)  # as /dev/serial/by-id names a real adapter
        assert MotorBus(emu.port, "feetech").timeout_margin_s == PTY_MARGIN_S > USB_MARGIN_S
        assert MotorBus(str(link), "feetech").timeout_margin_s == PTY_MARGIN_S
        assert MotorBus(f"spy://{emu.port}?file=bus.log", "feetech").timeout_margin_s == PTY_MARGIN_S
        assert MotorBus(emu.port, "feetech", timeout_margin_s=0.2).timeout_margin_s == 0.2
        emu.faults.silent = {1}
        with MotorBus(emu.port, "feetech", models={1: "sts3215"}, retries=0) as bus, \
                pytest.raises(BusTimeout) as info:
            bus.read("ID", 1)
    assert "reverie-sim emulate" in str(info.value) and "latency timer" not in str(info.value), str(info.value)
    assert MotorBus("/dev/ttyUSB0", "feetech").timeout_margin_s == USB_MARGIN_S


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_last_try_under_a_deadline_waits_out_the_budget(protocol: str) -> None:
    """Replies later than a try's own window but inside the control step's budget are used: giving up at the end
    of the last try's window would lose a tick to replies that were only late (a busy machine), not missing."""
    with emulated(protocol, n=3, retries=1, margin=0.005) as (emu, bus):
        emu.faults.delay_s = 0.05  # after each try's own window (~6 ms), far inside the budget
        values = bus.sync_read(["Present_Position"], [1, 2, 3], deadline=time.monotonic() + 2.0)
    assert sorted(values["Present_Position"]) == [1, 2, 3]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_replies_waiting_when_a_late_process_looks_are_taken(protocol: str) -> None:
    """A process the OS schedules late looks at the port only after its deadline: the statuses already there are
    read (one look, no waiting) instead of reported missing. A plain pty stands in for the bus, so the reply is
    certainly there before the look."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        with MotorBus(os.ttyname(slave), protocol, models={1: MODEL[protocol]}) as bus:
            os.write(master, bus.codec.status(1, 0, b""))
            assert wait_for(lambda: bus.input_waiting() > 0)
            got, bad = bus._receive([1], time.monotonic() - 1.0)  # the deadline has passed
        assert list(got) == [1] and not bad
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_follows_the_baud_rate(protocol: str) -> None:
    slow, fast = MotorBus("unused", protocol, 9600, timeout_margin_s=0.01), MotorBus("unused", protocol)
    assert slow.timeout_s(20, 100) > fast.timeout_s(20, 100)
    assert slow.timeout_s(20, 100, replies=2) == pytest.approx(120 * 10 / 9600 + 2 * 0.0005 + 0.01)
    # At the slowest baud, 12 statuses take ~200 ms (Feetech at 38400: a 58-byte span) or ~260 ms (Dynamixel
    # at 9600) on the wire, far beyond the 30 ms margin alone: a timeout that ignored the bytes would get a
    # servo or two per try. The retries only absorb the emulator's scheduling jitter on a busy machine.
    baud = min(MODELS[MODEL[protocol]].baud_codes.values())
    first = "Firmware_Version" if protocol == "feetech" else "Present_Current"
    with emulated(protocol, n=12, baud=baud, margin=0.03, retries=2) as (emu, bus):
        values = bus.sync_read([first, "Present_Position"], list(range(1, 13)))
        assert values["Present_Position"] == {i: emu.register(i, "Present_Position") for i in range(1, 13)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_scan_only_at_the_servos_baud(protocol: str) -> None:
    with emulated(protocol, n=3, baud=57600) as (_, bus):
        bus.set_baud(1_000_000)
        assert bus.scan(range(0, 10)) == []
        bus.set_baud(57600)
        found = bus.scan(range(0, 10))
        assert [s["id"] for s in found] == [1, 2, 3]
        assert found[0] == {"id": 1, "model": MODEL[protocol], "model_number": MODELS[MODEL[protocol]].model_number,
                            "firmware": MODELS[MODEL[protocol]].defaults["Firmware_Version"], "protocol": protocol,
                            "baud": 57600}


def test_port_held_by_another_open_is_refused() -> None:
    with emulated("feetech", n=1) as (emu, bus):
        other = MotorBus(emu.port, "feetech")
        with pytest.raises(MotorError, match=f"port {emu.port} is in use: another process holds it"):
            other.open()
        assert bus.read("ID", 1) == 1  # the first one still works
    reopened = MotorBus(emu.port, "feetech")
    assert not reopened.is_open


def test_missing_port_is_named(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB9")
    with pytest.raises(MotorError, match=f"port {port} does not exist.*/dev/serial/by-id"):
        MotorBus(port, "dynamixel").open()


def test_requests_on_a_closed_bus_say_so() -> None:
    with pytest.raises(MotorError, match="bus on /tmp/h2-x is not open"):
        MotorBus("/tmp/h2-x", "feetech", models={1: "sts3215"}).read("ID", 1)


def test_bad_models_map_is_refused() -> None:
    with pytest.raises(MotorConfigError, match="servo 3: model 'sts3215' speaks feetech, this bus dynamixel"):
        MotorBus("unused", "dynamixel", models={3: "sts3215"})
    with pytest.raises(MotorConfigError, match="servo 1: unknown model 'xl999'"):
        MotorBus("unused", "dynamixel", models={1: "xl999"})


def test_spy_url_logs_the_traffic_and_stays_exclusive(tmp_path: Path) -> None:
    log = tmp_path / "spy.txt"
    with ServoEmulator("feetech", [EmulatedServo(1, "sts3215", zero_ticks=2048)]) as emu:
        with MotorBus(f"spy://{emu.port}?file={log}", "feetech", timeout_margin_s=MARGIN) as bus:
            assert bus.read("Present_Position", 1) == 2048
            with pytest.raises(MotorError, match="in use"):
                MotorBus(emu.port, "feetech").open()
        text = log.read_text()
    assert "FF FF 01 04 02 38 02 BE" in text  # the reference's read of Present_Position, byte for byte
    assert " RX " in text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_threads_share_the_bus(protocol: str) -> None:
    with emulated(protocol, n=6, retries=3) as (emu, bus):
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for k in range(40):
                    bus.write("Goal_Position", 1 + k % 6, 2000 + k)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        for _ in range(40):
            values = bus.sync_read(["Present_Position"], list(range(1, 7)))["Present_Position"]
            assert values == {i: 1900 + 37 * (i - 1) for i in range(1, 7)}
        thread.join()
        assert not errors
        assert emu.register(6, "Goal_Position") == 2000 + 35


REFUSING_HANDLER = '''
import serial
from serial.urlhandler.protocol_loop import Serial as Loop


class Serial(Loop):
    """A URL handler that cannot lock its port (some network handlers cannot)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("exclusive"):
            raise ValueError("exclusive access is not supported by refusing://")
        super().__init__(*args, **kwargs)

    def from_url(self, url):
        return super().from_url(url.replace("refusing://", "loop://"))
'''


def test_url_handler_without_exclusive_access_opens_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import serial

    package = tmp_path / "h2_handlers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "protocol_refusing.py").write_text(REFUSING_HANDLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(serial, "protocol_handler_packages", [*serial.protocol_handler_packages, "h2_handlers"])
    with caplog.at_level("WARNING"), MotorBus("refusing://", "feetech") as bus:
        assert bus.is_open
    assert "port refusing://: its URL handler cannot lock the port exclusively" in caplog.text
