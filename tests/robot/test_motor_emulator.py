"""The emulated servo bus, spoken to through a real pyserial port with codec functions only (no driver):
replies byte for byte as servos give them, baud matching, faults, EEPROM rules, the bus watchdog."""

from __future__ import annotations

import math
import select
import time
from collections.abc import Iterator

import pytest
import serial

from robot.emulated.servo_bus import EmulatedServo, KinematicPlant, ServoEmulator
from robot.servo.codec import CorruptPacket, Packet
from robot.servo.dynamixel import hardware_error_names
from robot.servo.protocols import codec_for
from robot.servo.tables import MODELS

DXL_MODEL = "xl330-m288"
MODEL = {"dynamixel": DXL_MODEL, "feetech": "sts3215"}
PROTOCOLS = ["dynamixel", "feetech"]
TICKS_PER_RAD = 4096 / (2 * math.pi)
WAIT_S = 1.0  # generous: a reply normally comes within a few ms
QUIET_S = 0.15  # how long "no reply" is waited for where no barrier can follow (every reply dropped)


class Host:
    """The host end of the bus: a pyserial port and the codec, nothing else."""

    def __init__(self, emulator: ServoEmulator, protocol: str, baud: int = 1_000_000) -> None:
        self.codec = codec_for(protocol)
        self.model = MODELS[MODEL[protocol]]
        self.port = serial.Serial(emulator.port, baud, timeout=0)
        self.buf = bytearray()
        self.corrupt: list[CorruptPacket] = []

    def ask(self, packet: bytes, n: int = 1, wait: float = WAIT_S) -> list[Packet]:
        """Send `packet` and collect up to `n` status packets within `wait` seconds."""
        self.port.reset_input_buffer()
        self.buf.clear()
        self.port.write(packet)
        return self.collect(n, wait)

    def collect(self, n: int, wait: float) -> list[Packet]:
        out: list[Packet] = []
        deadline = time.monotonic() + wait
        while len(out) < n and time.monotonic() < deadline:
            self.buf += self.port.read(4096)
            while True:
                try:
                    packet = self.codec.take(self.buf, status=True)
                except CorruptPacket as exc:
                    self.corrupt.append(exc)
                    continue
                if packet is None:
                    break
                out.append(packet)
            time.sleep(0.001)
        return out

    def ask_quiet(self, packet: bytes, barrier: int) -> list[Packet]:
        """Every reply to `packet`, known to be complete: a read of servo `barrier`'s ID follows it and the
        bus answers in order, so its reply marks the end (no guessing how long silence must last)."""
        reg = self.model.reg("ID")
        marker = self.codec.read(barrier, reg.address, reg.size)
        self.port.reset_input_buffer()
        self.buf.clear()
        self.port.write(packet + marker)
        out: list[Packet] = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for reply in self.collect(1, deadline - time.monotonic()):
                if reply.id == barrier and reply.params == bytes([barrier]):
                    return out
                out.append(reply)
        raise AssertionError(f"servo {barrier} did not answer the barrier read")

    def read(self, id: int, name: str) -> int:
        reg = self.model.reg(name)
        [reply] = self.ask(self.codec.read(id, reg.address, reg.size))
        assert reply.id == id and reply.code & 0x7F == 0, f"read of {name} from servo {id}: {reply}"
        return self.codec.decode(reply.params, reg)

    def write(self, id: int, name: str, value: int) -> Packet:
        reg = self.model.reg(name)
        [reply] = self.ask(self.codec.write(id, reg.address, self.codec.encode(value, reg)))
        assert reply.id == id and reply.params == b""
        return reply

    def close(self) -> None:
        self.port.close()


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def bus(protocol: str) -> Iterator[tuple[ServoEmulator, Host, KinematicPlant]]:
    """Three servos with different mounting offsets and directions, on a kinematic plant."""
    plant = KinematicPlant(3, max_speed=4.0, initial=[0.0, 0.5, -1.0])
    servos = [EmulatedServo(1, MODEL[protocol]), EmulatedServo(2, MODEL[protocol], zero_ticks=1800, direction=-1),
              EmulatedServo(3, MODEL[protocol], zero_ticks=2300)]
    with ServoEmulator(protocol, servos, plant) as emulator:
        host = Host(emulator, protocol)
        try:
            yield emulator, host, plant
        finally:
            host.close()
        assert emulator.stats["internal_errors"] == 0


def expected_ticks(zero: int, direction: int, angle: float) -> int:
    return (zero + direction * round(angle * TICKS_PER_RAD)) % 4096


def wait_for(condition, what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# ----- plain requests -------------------------------------------------------------------------------------

def test_ping_reports_the_model(bus, protocol):
    emulator, host, _ = bus
    [reply] = host.ask(host.codec.ping(2))
    assert (reply.id, reply.code) == (2, 0)
    if protocol == "dynamixel":
        assert int.from_bytes(reply.params[:2], "little") == 1200 and len(reply.params) == 3
    else:
        assert reply.params == b""
        assert host.read(2, "Model_Number") == 777
    assert host.ask_quiet(host.codec.ping(9), barrier=1) == []  # not on the bus: silence
    assert emulator.stats["ignored"] >= 1


def test_broadcast_ping_every_servo_answers_in_id_order(bus):
    _, host, _ = bus
    replies = host.ask(host.codec.ping(host.codec.BROADCAST), n=3)
    assert [r.id for r in replies] == [1, 2, 3]


def test_read_and_write_a_register(bus, protocol):
    emulator, host, _ = bus
    assert host.read(3, "Torque_Enable") == 0
    assert host.write(3, "Torque_Enable", 1).code == 0
    assert host.read(3, "Torque_Enable") == 1
    assert emulator.torque_enabled() == {1: False, 2: False, 3: True}
    name = "LED" if protocol == "dynamixel" else "Acceleration"
    host.write(1, name, 17)
    assert emulator.register(1, name) == 17 and host.read(1, name) == 17


def test_sync_read_positions_in_request_order(bus):
    emulator, host, _ = bus
    reg = host.model.reg("Present_Position")
    replies = host.ask(host.codec.sync_read(reg.address, reg.size, [3, 1, 2]), n=3)
    assert [r.id for r in replies] == [3, 1, 2]
    got = {r.id: host.codec.decode(r.params, reg) for r in replies}
    assert got == {1: expected_ticks(2048, 1, 0.0), 2: expected_ticks(1800, -1, 0.5),
                   3: expected_ticks(2300, 1, -1.0)}
    assert emulator.stats["sync_reads"] == 1


def test_sync_write_moves_the_kinematic_plant(bus):
    emulator, host, plant = bus
    for id in (1, 2, 3):
        host.write(id, "Torque_Enable", 1)
    goal = host.model.reg("Goal_Position")
    targets = {1: 0.3, 2: 0.2, 3: -0.6}
    ticks = {1: 2048 + round(0.3 * TICKS_PER_RAD), 2: 1800 - round(0.2 * TICKS_PER_RAD),
             3: 2300 + round(-0.6 * TICKS_PER_RAD)}
    data = {id: host.codec.encode(t, goal) for id, t in ticks.items()}
    assert host.ask_quiet(host.codec.sync_write(goal.address, goal.size, data), barrier=1) == []  # no reply
    assert emulator.stats["sync_writes"] == 1
    for i, id in enumerate((1, 2, 3)):
        assert plant.goals[i] == pytest.approx(targets[id], abs=1.5 / TICKS_PER_RAD)
    wait_for(lambda: max(abs(plant.state()[0] - [0.3, 0.2, -0.6])) < 2e-3, "the joints to reach their goals")
    assert host.read(2, "Present_Position") == ticks[2]


def test_present_velocity_and_load_follow_the_plant(protocol):
    plant = KinematicPlant(1, max_speed=2.0)
    with ServoEmulator(protocol, [EmulatedServo(1, MODEL[protocol], direction=-1)], plant) as emulator:
        host = Host(emulator, protocol)
        host.write(1, "Goal_Position", 2048 - round(3.0 * TICKS_PER_RAD))  # 3 rad away: moves for 1.5 s
        host.write(1, "Torque_Enable", 1)
        time.sleep(0.05)
        velocity = host.read(1, "Present_Velocity") * host.model.velocity_unit
        load = host.read(1, host.model.load_register) / host.model.load_max
        host.close()
    assert velocity == pytest.approx(-2.0, rel=0.05)  # direction -1: ticks fall as the angle grows
    assert load == pytest.approx(-1.0)  # far from the goal: full load, in the servo's direction


def test_torque_limit_reaches_the_plant(protocol):
    plant = KinematicPlant(1)
    with ServoEmulator(protocol, [EmulatedServo(1, MODEL[protocol])], plant) as emulator:
        host = Host(emulator, protocol)
        model = host.model
        half = model.torque_limit_max // 2
        if protocol == "dynamixel":
            host.write(1, "Goal_Current", half)
            assert plant.limits[0] == 1.0  # position mode: Goal_Current does not limit
            host.write(1, "Operating_Mode", 5)
        else:
            host.write(1, "Torque_Limit", half)
        assert plant.limits[0] == pytest.approx(half / model.torque_limit_max)
        host.close()


def test_homing_offset_shifts_present_position_with_each_protocols_sign(bus, protocol):
    emulator, host, _ = bus
    if protocol == "feetech":
        host.write(1, "Lock", 0)
    before = host.read(1, "Present_Position")
    host.write(1, "Homing_Offset", -300)
    shift = -300 if protocol == "dynamixel" else 300  # Dynamixel adds the offset, Feetech subtracts it
    assert host.read(1, "Present_Position") == before + shift


def test_dynamixel_position_wraps_in_position_mode_only():
    plant = KinematicPlant(1, initial=[0.5])
    with ServoEmulator("dynamixel", [EmulatedServo(1, DXL_MODEL, zero_ticks=4000)], plant) as emulator:
        host = Host(emulator, "dynamixel")
        unwrapped = 4000 + round(0.5 * TICKS_PER_RAD)
        assert host.read(1, "Present_Position") == unwrapped - 4096
        host.write(1, "Operating_Mode", 4)  # extended position: multi-turn
        assert host.read(1, "Present_Position") == unwrapped
        host.close()


def test_timing_reply_comes_no_earlier_than_the_wire_allows():
    servo = EmulatedServo(1, DXL_MODEL, baud=9600)
    with ServoEmulator("dynamixel", [servo]) as emulator:
        host = Host(emulator, "dynamixel", baud=9600)
        ping = host.codec.ping(1)
        start = time.monotonic()
        [reply] = host.ask(ping)
        elapsed = time.monotonic() - start
        host.close()
    wire = (len(ping) + host.codec.wire_bytes(3, True)) * 10 / 9600 + 250 * 2e-6
    assert reply.id == 1 and elapsed >= wire


def test_a_sync_reads_statuses_come_in_one_transfer_once_the_last_is_due(protocol: str):
    """Six statuses reach the host together, as a USB adapter hands over what it gathered, and no earlier than the
    last of them could have crossed the wire: one wake-up of the host per request instead of six, each of which
    comes late on a busy machine (issue 23)."""
    baud = 57_600  # statuses ~2 ms apart on the wire: sent one by one, the host would see them one by one
    servos = [EmulatedServo(i, MODEL[protocol], baud=baud) for i in range(1, 7)]
    with ServoEmulator(protocol, servos) as emulator:
        host = Host(emulator, protocol, baud=baud)
        reg = host.model.reg("Present_Position")
        request = host.codec.sync_read(reg.address, reg.size, list(range(1, 7)))
        delays = sum(emulator.register(i, "Return_Delay_Time") * 2e-6 for i in range(1, 7))
        host.port.reset_input_buffer()
        start = time.monotonic()
        host.port.write(request)
        ready, _, _ = select.select([host.port.fileno()], [], [], WAIT_S)
        elapsed = time.monotonic() - start
        first = host.port.read(4096)
        host.close()
    assert ready
    reply = host.codec.wire_bytes(reg.size, True)
    assert len(first) == 6 * reply, f"{len(first)} bytes came first, of {6 * reply}"
    assert elapsed >= (len(request) + 6 * reply) * 10 / baud + delays


# ----- baud rates, ids --------------------------------------------------------------------------------------

def test_a_servo_answers_only_at_its_baud(protocol):
    slow = 57_600
    servos = [EmulatedServo(1, MODEL[protocol]), EmulatedServo(2, MODEL[protocol], baud=slow)]
    with ServoEmulator(protocol, servos) as emulator:
        host = Host(emulator, protocol)
        assert [r.id for r in host.ask_quiet(host.codec.ping(host.codec.BROADCAST), barrier=1)] == [1]
        assert host.ask_quiet(host.codec.ping(2), barrier=1) == []
        assert emulator.stats["wrong_baud"] == 1
        host.port.baudrate = slow
        assert [r.id for r in host.ask(host.codec.ping(2))] == [2]
        assert host.ask_quiet(host.codec.ping(1), barrier=2) == []
        host.close()


def test_id_change_takes_effect_after_the_reply(bus, protocol):
    emulator, host, _ = bus
    if protocol == "feetech":
        host.write(1, "Lock", 0)
    reply = host.write(1, "ID", 7)
    assert (reply.id, reply.code) == (1, 0)  # acknowledged under the old id
    assert host.ask_quiet(host.codec.ping(1), barrier=2) == []
    assert [r.id for r in host.ask(host.codec.ping(7))] == [7]
    assert emulator.register(7, "ID") == 7


def test_baud_change_takes_effect_after_the_reply(bus, protocol):
    _, host, _ = bus
    if protocol == "feetech":
        host.write(2, "Lock", 0)
    code = host.model.baud_code(115_200)
    assert host.write(2, "Baud_Rate", code).code == 0  # the reply still comes at the old baud
    assert host.ask_quiet(host.codec.ping(2), barrier=1) == []
    host.port.baudrate = 115_200
    assert [r.id for r in host.ask(host.codec.ping(2))] == [2]
    assert host.read(2, "Baud_Rate") == code


# ----- EEPROM rules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["dynamixel"])
def test_dynamixel_eeprom_write_refused_with_torque_on(bus):
    emulator, host, _ = bus
    host.write(1, "Torque_Enable", 1)
    reply = host.write(1, "Operating_Mode", 5)
    assert host.codec.error_names(reply.code) == ["access error"]
    assert emulator.register(1, "Operating_Mode") == 3
    host.write(1, "Torque_Enable", 0)
    assert host.write(1, "Operating_Mode", 5).code == 0
    assert host.read(1, "Operating_Mode") == 5
    assert host.codec.error_names(host.write(1, "Present_Position", 5).code) == ["access error"]  # read-only


@pytest.mark.parametrize("protocol", ["feetech"])
def test_feetech_eeprom_needs_lock_0_and_torque_off(bus):
    emulator, host, _ = bus
    assert host.write(1, "Min_Position_Limit", 100).code == 0  # locked: acknowledged, not applied
    assert host.read(1, "Min_Position_Limit") == 0
    host.write(1, "Lock", 0)
    host.write(1, "Torque_Enable", 1)
    host.write(1, "Min_Position_Limit", 100)
    assert host.read(1, "Min_Position_Limit") == 0  # torque on: refused
    host.write(1, "Torque_Enable", 0)
    host.write(1, "Min_Position_Limit", 100)
    assert host.read(1, "Min_Position_Limit") == 100
    host.write(1, "Goal_Position", 50)
    assert emulator.register(1, "Goal_Position") == 100  # clamped into the limits


@pytest.mark.parametrize("protocol", ["dynamixel"])
def test_dynamixel_goal_outside_limits_is_refused(bus):
    emulator, host, _ = bus
    before = emulator.register(1, "Goal_Position")
    reply = host.write(1, "Goal_Position", 5000)
    assert host.codec.error_names(reply.code) == ["data limit error"]
    assert emulator.register(1, "Goal_Position") == before


# ----- faults --------------------------------------------------------------------------------------------------

def test_dropped_reply(bus):
    emulator, host, _ = bus
    emulator.faults.drop_rate = 1.0
    assert host.ask(host.codec.ping(1), wait=QUIET_S) == []
    wait_for(lambda: emulator.stats["dropped"] == 1, "the drop to be counted")
    emulator.faults.drop_rate = 0.0
    assert [r.id for r in host.ask(host.codec.ping(1))] == [1]


def test_corrupt_reply_fails_its_check(bus):
    emulator, host, _ = bus
    emulator.faults.corrupt_rate = 1.0
    host.port.write(host.codec.ping(3))
    wait_for(lambda: emulator.stats["answered"] == 1, "the corrupted reply to be sent")
    assert host.collect(1, QUIET_S) == []  # its bytes are in the port: they fail the check
    assert [e.id for e in host.corrupt] == [3]
    assert emulator.stats["corrupted"] == 1



def test_drop_rate_is_a_fraction_and_seeded(protocol):
    def run() -> int:
        with ServoEmulator(protocol, [EmulatedServo(1, MODEL[protocol])], timing=False, seed=5) as emulator:
            emulator.faults.drop_rate = 0.5
            host = Host(emulator, protocol)
            for _ in range(40):
                host.port.write(host.codec.ping(1))
                time.sleep(0.002)
            wait_for(lambda: emulator.stats["answered"] + emulator.stats["dropped"] == 40, "40 replies")
            host.close()
            return emulator.stats["answered"]

    first = run()
    assert 5 <= first <= 35
    assert run() == first


def test_silent_servo_is_missing_from_a_sync_read(bus):
    emulator, host, _ = bus
    emulator.faults.silent.add(2)
    reg = host.model.reg("Present_Position")
    replies = host.ask_quiet(host.codec.sync_read(reg.address, reg.size, [1, 2, 3]), barrier=1)
    assert [r.id for r in replies] == [1, 3]
    emulator.faults.silent.clear()
    assert len(host.ask(host.codec.sync_read(reg.address, reg.size, [1, 2, 3]), n=3)) == 3


def test_feetech_error_bits_in_every_status():
    with ServoEmulator("feetech", [EmulatedServo(1, "sts3215"), EmulatedServo(2, "sts3215")]) as emulator:
        host = Host(emulator, "feetech")
        emulator.faults.error_bits[2] = 0x24
        replies = host.ask(host.codec.sync_read(56, 2, [1, 2]), n=2)
        assert [(r.id, host.codec.error_names(r.code)) for r in replies] == [(1, []), (2, ["overheating", "overload"])]
        assert host.codec.error_names(host.ask(host.codec.ping(2))[0].code) == ["overheating", "overload"]
        host.close()


def test_dynamixel_hardware_alert_shuts_torque_off_until_reboot():
    with ServoEmulator("dynamixel", [EmulatedServo(1, DXL_MODEL), EmulatedServo(2, DXL_MODEL)]) as emulator:
        host = Host(emulator, "dynamixel")
        for id in (1, 2):
            host.write(id, "Torque_Enable", 1)
        emulator.faults.error_bits[2] = 0x80
        emulator.faults.hardware_error[1] = 1 << 2  # overheating, without the alert injected by hand
        wait_for(lambda: emulator.torque_enabled() == {1: False, 2: False}, "the shutdown to turn torque off")
        [reply] = host.ask(host.codec.ping(2))
        assert host.codec.error_names(reply.code) == ["hardware alert"]
        assert hardware_error_names(host.read(2, "Hardware_Error_Status")) == ["overload"]
        assert hardware_error_names(host.read(1, "Hardware_Error_Status")) == ["overheating"]
        host.write(2, "Torque_Enable", 1)
        assert emulator.torque_enabled()[2] is False  # shut down: torque stays off
        emulator.faults.error_bits.clear()
        emulator.faults.hardware_error.clear()
        assert host.ask(host.codec.instruction(2, host.codec.REBOOT))[0].id == 2
        wait_for(lambda: emulator.register(2, "Hardware_Error_Status") == 0, "the reboot")
        assert host.ask(host.codec.ping(2))[0].code == 0
        host.write(2, "Torque_Enable", 1)
        assert emulator.torque_enabled() == {1: False, 2: True}
        host.close()


def test_slow_bus_delay(bus):
    emulator, host, _ = bus
    emulator.faults.delay_s = 0.3
    start = time.monotonic()
    assert host.ask(host.codec.ping(1), wait=0.1) == []
    [reply] = host.collect(1, WAIT_S)
    assert reply.id == 1 and time.monotonic() - start >= 0.3


def test_corrupt_instruction_gets_a_crc_error_from_dynamixel(bus):
    emulator, host, _ = bus
    packet = bytearray(host.codec.ping(1))
    packet[-1] ^= 0xFF
    replies = host.ask_quiet(bytes(packet), barrier=1)
    assert emulator.stats["corrupt_received"] == 1
    if host.codec.name == "dynamixel":
        assert [host.codec.error_names(r.code) for r in replies] == [["CRC error"]]
    else:
        assert replies == []
    assert host.ask(host.codec.ping(1))[0].code == 0  # and the bus goes on


def test_garbage_and_split_packets_on_the_wire(bus):
    _, host, _ = bus
    ping = host.codec.ping(3)
    host.port.write(b"\x00\x13\x37" + ping[:4])
    time.sleep(0.02)
    host.port.write(ping[4:])
    assert [r.id for r in host.collect(1, WAIT_S)] == [3]


# ----- Dynamixel bus watchdog ---------------------------------------------------------------------------------

def test_dynamixel_bus_watchdog_holds_the_joint_when_the_host_goes_silent():
    plant = KinematicPlant(1, max_speed=0.5)
    with ServoEmulator("dynamixel", [EmulatedServo(1, DXL_MODEL)], plant) as emulator:
        host = Host(emulator, "dynamixel")
        host.write(1, "Torque_Enable", 1)
        host.write(1, "Bus_Watchdog", 5)  # 100 ms
        far = 2048 + round(2.0 * TICKS_PER_RAD)
        host.write(1, "Goal_Position", far)  # 4 s of travel at 0.5 rad/s
        wait_for(lambda: emulator.register(1, "Bus_Watchdog") == -1, "the bus watchdog to fire")
        held = plant.goals[0]
        assert 0.0 < held < 1.0 and plant.torque[0]  # holds where it was, torque still on
        time.sleep(0.2)
        assert plant.state()[0][0] == pytest.approx(held)
        assert host.read(1, "Bus_Watchdog") == -1
        assert host.read(1, "Goal_Position") == 2048 + round(held * TICKS_PER_RAD)
        reply = host.write(1, "Goal_Position", far)
        assert host.codec.error_names(reply.code) == ["data range error"]
        assert plant.goals[0] == held  # goals are ignored ...
        host.write(1, "Bus_Watchdog", 0)  # ... until the watchdog is cleared
        assert host.write(1, "Goal_Position", far).code == 0
        assert plant.goals[0] == pytest.approx(2.0, abs=1e-3)
        assert emulator.stats["watchdog_fired"] == 1
        host.close()


def test_dynamixel_bus_watchdog_does_not_fire_while_the_host_talks():
    with ServoEmulator("dynamixel", [EmulatedServo(1, DXL_MODEL)]) as emulator:
        host = Host(emulator, "dynamixel")
        host.write(1, "Torque_Enable", 1)
        host.write(1, "Bus_Watchdog", 20)  # 400 ms
        for _ in range(30):
            host.read(1, "Present_Position")
            time.sleep(0.03)
        assert emulator.register(1, "Bus_Watchdog") == 20
        host.close()


# ----- lifecycle --------------------------------------------------------------------------------------------

def test_close_does_not_hang_mid_reply_and_is_repeatable():
    emulator = ServoEmulator("feetech", [EmulatedServo(1, "sts3215")]).start()
    host = Host(emulator, "feetech")
    emulator.faults.delay_s = 30.0
    host.port.write(host.codec.ping(1))
    wait_for(lambda: emulator.stats["received"] == 1, "the ping to arrive")
    emulator.close()
    emulator.close()
    assert not emulator._thread.is_alive()
    host.close()


def test_bad_servo_lists_are_rejected():
    with pytest.raises(ValueError, match="share ids"):
        ServoEmulator("feetech", [EmulatedServo(1, "sts3215"), EmulatedServo(1, "sts3215")])
    with pytest.raises(ValueError, match="speaks dynamixel"):
        ServoEmulator("feetech", [EmulatedServo(1, DXL_MODEL)])
    with pytest.raises(ValueError, match="cannot run at 9600"):
        ServoEmulator("feetech", [EmulatedServo(1, "sts3215", baud=9600)])
