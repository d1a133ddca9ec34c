"""Servo protocol codecs: byte-exact packets from the reference, CRC/checksum, stuffing, value encoding,
robust parsing of a noisy byte stream, and the control tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robot.servo.codec import CorruptPacket, Packet
from robot.servo.dynamixel import DynamixelCodec, crc16, hardware_error_names, stuff, unstuff
from robot.servo.errors import BusCorrupt, BusTimeout, MotorConfigError, MotorError, ServoFault, UnknownRegister
from robot.servo.feetech import FeetechCodec
from robot.servo.protocols import CODECS, codec_for
from robot.servo.tables import MODELS, Register, model_for

DXL = DynamixelCodec()
FT = FeetechCodec()
XL = MODELS["xl330-m288"]
STS = MODELS["sts3215"]


def b(text: str) -> bytes:
    return bytes.fromhex(text)


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


# ----- byte-exact packets (reference: Dynamixel manual examples; Feetech by the checksum rule) -----------

DXL_PACKETS = [
    ("ping", lambda: DXL.ping(1), "FF FF FD 00 01 03 00 01 19 4E", Packet(1, 0x01, b"")),
    ("read", lambda: DXL.read(1, 132, 4), "FF FF FD 00 01 07 00 02 84 00 04 00 1D 15",
     Packet(1, 0x02, b("84 00 04 00"))),
    ("write", lambda: DXL.write(1, 116, le(512, 4)), "FF FF FD 00 01 09 00 03 74 00 00 02 00 00 CA 89",
     Packet(1, 0x03, b("74 00 00 02 00 00"))),
    ("sync read", lambda: DXL.sync_read(132, 4, [1, 2]), "FF FF FD 00 FE 09 00 82 84 00 04 00 01 02 CE FA",
     Packet(0xFE, 0x82, b("84 00 04 00 01 02"))),
    ("sync write", lambda: DXL.sync_write(116, 4, {1: le(150, 4), 2: le(170, 4)}),
     "FF FF FD 00 FE 11 00 83 74 00 04 00 01 96 00 00 00 02 AA 00 00 00 82 87",
     Packet(0xFE, 0x83, b("74 00 04 00 01 96 00 00 00 02 AA 00 00 00"))),
]

FT_PACKETS = [
    ("ping", lambda: FT.ping(1), "FF FF 01 02 01 FB", Packet(1, 0x01, b"")),
    ("read", lambda: FT.read(1, 56, 2), "FF FF 01 04 02 38 02 BE", Packet(1, 0x02, b("38 02"))),
    ("write", lambda: FT.write(1, 42, le(2048, 2)), "FF FF 01 05 03 2A 00 08 C4", Packet(1, 0x03, b("2A 00 08"))),
    ("sync read", lambda: FT.sync_read(56, 2, [1, 2, 3, 4, 5, 6]), "FF FF FE 0A 82 38 02 01 02 03 04 05 06 26",
     Packet(0xFE, 0x82, b("38 02 01 02 03 04 05 06"))),
    ("sync write", lambda: FT.sync_write(42, 2, {1: le(2048, 2), 2: le(1024, 2)}),
     "FF FF FE 0A 83 2A 02 01 00 08 02 00 04 39", Packet(0xFE, 0x83, b("2A 02 01 00 08 02 00 04"))),
]


@pytest.mark.parametrize(("codec", "name", "build", "wire", "packet"),
                         [(DXL, *p) for p in DXL_PACKETS] + [(FT, *p) for p in FT_PACKETS],
                         ids=[f"dynamixel {p[0]}" for p in DXL_PACKETS] + [f"feetech {p[0]}" for p in FT_PACKETS])
def test_reference_instruction_packets(codec, name, build, wire, packet):
    assert build() == b(wire)
    buf = bytearray(b(wire))
    assert codec.take(buf, status=False) == packet
    assert buf == b""


def test_dynamixel_status_example_builds_and_parses():
    wire = b("FF FF FD 00 01 08 00 55 00 A6 00 00 00 8C C0")
    assert DXL.status(1, 0, le(166, 4)) == wire
    packet = DXL.take(bytearray(wire), status=True)
    assert packet == Packet(1, 0, le(166, 4))
    assert DXL.decode(packet.params, XL.reg("Present_Position")) == 166


def test_dynamixel_crc_check_value_and_table_matches_bitwise_definition():
    assert crc16(b"123456789") == 0xFEE8

    def bitwise(data: bytes) -> int:
        crc = 0
        for byte in data:
            crc ^= byte << 8
            for _ in range(8):
                crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        return crc

    for data in (b"", b"\x00", b"\xff" * 7, bytes(range(256))):
        assert crc16(data) == bitwise(data)


@pytest.mark.parametrize(("codec", "status", "params"), [(DXL, False, 4), (DXL, True, 4), (FT, False, 2),
                                                         (FT, True, 2), (DXL, True, 0), (FT, False, 0)])
def test_wire_bytes_is_the_length_of_a_packet(codec, status, params):
    data = bytes(range(1, params + 1))
    packet = codec.status(3, 0, data) if status else codec.instruction(3, 2, data)
    assert codec.wire_bytes(params, status) == len(packet)


# ----- byte stuffing ------------------------------------------------------------------------------------

def test_stuffing_inserts_fd_counts_it_in_len_and_round_trips():
    params = b("FF FF FD 01 FF FF FD")
    packet = DXL.instruction(2, 0x03, params)
    body = packet[8:-2]
    assert body == b("FF FF FD FD 01 FF FF FD FD")
    assert int.from_bytes(packet[5:7], "little") == 1 + len(body) + 2  # LEN counts the stuffed bytes
    assert packet.count(b("FF FF FD 00")) == 1  # no header inside the packet
    assert crc16(packet[:-2]) == int.from_bytes(packet[-2:], "little")  # CRC over the stuffed bytes
    assert DXL.take(bytearray(packet), status=False) == Packet(2, 0x03, params)


def test_stuffing_a_status_payload_round_trips():
    params = b("00 FF FF FD FD 7F")
    packet = DXL.status(9, 0x80, params)
    assert b("FF FF FD FD FD") in packet
    assert DXL.take(bytearray(packet), status=True) == Packet(9, 0x80, params)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0x00, 0xFD, 0xFF, 0x01]), max_size=40).map(bytes))
def test_stuff_unstuff_round_trip(payload):
    stuffed = stuff(payload)
    assert unstuff(stuffed) == payload
    assert b"\xff\xff\xfd\x00" not in stuffed
    assert len(stuffed) == len(payload) + payload.count(b"\xff\xff\xfd")  # FF FF FD cannot overlap itself


# ----- value encoding -----------------------------------------------------------------------------------

def test_feetech_sign_magnitude():
    goal = STS.reg("Goal_Position")
    assert FT.encode(-100, goal) == le(0x8064, 2)
    assert FT.decode(le(0x8064, 2), goal) == -100
    assert FT.encode(100, goal) == le(100, 2)
    offset = STS.reg("Homing_Offset")
    assert FT.encode(-100, offset) == le(0x0864, 2)
    assert FT.decode(le(0x0864, 2), offset) == -100
    load = STS.reg("Present_Load")
    assert FT.decode(le(0x0400 | 500, 2), load) == -500
    assert FT.decode(le(0x8000, 2), goal) == 0  # "-0" reads as 0
    with pytest.raises(ValueError, match="Homing_Offset"):
        FT.encode(2048, offset)  # needs bit 11 for the sign
    with pytest.raises(ValueError, match="Goal_Position"):
        FT.encode(-32768, goal)
    with pytest.raises(ValueError, match="ID"):
        FT.encode(-1, STS.reg("ID"))


def test_dynamixel_twos_complement():
    pos = XL.reg("Present_Position")
    assert DXL.encode(-100, pos) == b("9C FF FF FF")
    assert DXL.decode(b("9C FF FF FF"), pos) == -100
    assert DXL.decode(b("FF"), XL.reg("Bus_Watchdog")) == -1
    assert DXL.decode(b("FF FF FF FF"), XL.reg("Profile_Velocity")) == 2**32 - 1  # unsigned
    with pytest.raises(ValueError, match="Torque_Enable"):
        DXL.encode(256, XL.reg("Torque_Enable"))
    with pytest.raises(ValueError, match="Max_Position_Limit"):
        DXL.encode(-1, XL.reg("Max_Position_Limit"))
    with pytest.raises(ValueError, match="4 bytes"):
        DXL.decode(b"\x00\x00", pos)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**15) + 1, 2**15 - 1))
def test_sign_magnitude_round_trip(value):
    reg = STS.reg("Goal_Velocity")
    assert FT.decode(FT.encode(value, reg), reg) == value


# ----- parsing a noisy stream ---------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [DXL, FT], ids=["dynamixel", "feetech"])
def test_take_drops_garbage_before_a_header(codec):
    packet = codec.status(4, 0, b("11 22"))
    buf = bytearray(b("00 13 FF 37 FF") + packet + b("FF"))
    assert codec.take(buf, status=True) == Packet(4, 0, b("11 22"))
    assert buf == b("FF")  # may be the start of the next header: kept
    assert codec.take(buf, status=True) is None


@pytest.mark.parametrize("codec", [DXL, FT], ids=["dynamixel", "feetech"])
def test_take_waits_for_a_partial_packet_and_keeps_its_bytes(codec):
    packet = codec.status(5, 0, b("01 02 03 04"))
    buf = bytearray()
    for i, byte in enumerate(packet):
        assert codec.take(buf, status=True) is None, f"a packet came out after {i} bytes"
        buf.append(byte)
    assert codec.take(buf, status=True) == Packet(5, 0, b("01 02 03 04"))
    assert buf == b""


@pytest.mark.parametrize("codec", [DXL, FT], ids=["dynamixel", "feetech"])
def test_take_raises_on_a_bad_checksum_after_removing_the_packet(codec):
    bad = bytearray(codec.status(6, 0, b("10 20")))
    bad[-1] ^= 0x01
    good = codec.status(7, 0, b("30"))
    buf = bytearray(b("AA") + bad + good)
    with pytest.raises(CorruptPacket) as info:
        codec.take(buf, status=True)
    assert info.value.id == 6
    assert info.value.consumed == len(bad)
    assert "6" in str(info.value)
    assert codec.take(buf, status=True) == Packet(7, 0, b("30"))  # the stream recovers


def test_take_rejects_an_impossible_dynamixel_length():
    buf = bytearray(b("FF FF FD 00 01 01 00 55") + DXL.status(2, 0))
    with pytest.raises(CorruptPacket, match="length"):
        DXL.take(buf, status=True)
    assert DXL.take(buf, status=True) == Packet(2, 0, b"")


def test_take_finds_a_feetech_header_after_a_stray_ff():
    buf = bytearray(b("FF") + FT.ping(1))
    assert FT.take(buf, status=False) == Packet(1, 1, b"")


def test_dynamixel_take_skips_packets_of_the_other_kind():
    buf = bytearray(DXL.ping(1) + DXL.status(1, 0, b("B0 04 34")))
    assert DXL.take(buf, status=True) == Packet(1, 0, b("B0 04 34"))
    buf = bytearray(DXL.status(1, 0) + DXL.ping(3))
    assert DXL.take(buf, status=False) == Packet(3, 1, b"")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([DXL, FT]), st.integers(0, 252), st.integers(0, 0x7F),
       st.binary(max_size=60), st.booleans(), st.binary(max_size=8))
def test_round_trip_any_packet(codec, id, code, params, status, garbage):
    if status:
        code |= 0x80 if codec is DXL else 0
        packet = codec.status(id, code, params)
    else:
        code = code if codec is FT or code != 0x55 else 0x56  # 0x55 marks a Dynamixel status
        packet = codec.instruction(id, code, params)
    garbage = garbage.replace(b"\xff", b"")  # garbage must not start a header that swallows the packet
    buf = bytearray(garbage + packet + packet[:3])
    assert codec.take(buf, status=status) == Packet(id, code, params)
    assert codec.take(buf, status=status) is None
    assert buf == packet[:3]


# ----- error names --------------------------------------------------------------------------------------

def test_error_names():
    assert DXL.error_names(0) == []
    assert DXL.error_names(0x80) == ["hardware alert"]
    assert DXL.error_names(0x87) == ["hardware alert", "access error"]
    assert [DXL.error_names(n)[0] for n in range(1, 8)] == [
        "result fail", "instruction error", "CRC error", "data range error", "data length error",
        "data limit error", "access error"]
    assert hardware_error_names(0x24) == ["overheating", "overload"]
    assert FT.error_names(0) == []
    assert FT.error_names(0x24) == ["overheating", "overload"]
    assert FT.error_names(0x0B) == ["voltage", "angle sensor", "over-current"]
    assert FT.error_names(0x10) == ["error bit 0x10"]


def test_error_messages_name_port_servo_and_what():
    timeout = BusTimeout("/dev/ttyUSB0", [3], "sync read of Present_Position", tries=3)
    assert str(timeout) == "/dev/ttyUSB0: servo 3 did not answer sync read of Present_Position (3 tries)"
    assert (timeout.port, timeout.ids, timeout.what) == ("/dev/ttyUSB0", [3], "sync read of Present_Position")
    assert "servos 2, 5 did not" in str(BusTimeout("/dev/x", [2, 5], "a ping"))
    fault = ServoFault("/dev/ttyUSB0", 6, ["overload", "overheating"])
    assert str(fault) == "/dev/ttyUSB0: servo 6 reports overload, overheating"
    corrupt = BusCorrupt("/dev/x", 4, "a read of ID", "CRC mismatch")
    assert "/dev/x" in str(corrupt) and "servo 4" in str(corrupt) and corrupt.id == 4
    assert all(issubclass(e, MotorError) for e in (BusTimeout, BusCorrupt, ServoFault, MotorConfigError))


# ----- tables and codec lookup --------------------------------------------------------------------------

def test_tables_have_the_reference_addresses():
    assert XL.reg("Goal_Position") == Register("Goal_Position", 116, 4, signed=True)
    assert XL.reg("Firmware_Version").address == 6
    assert XL.reg("Bus_Watchdog").signed
    assert STS.reg("Present_Position").sign_bit == 15 and STS.reg("Homing_Offset").sign_bit == 11
    assert STS.reg("Present_Load").sign_bit == 10 and STS.reg("Present_Current").sign_bit == 15
    assert STS.reg("Lock").address == 55 and not STS.reg("Lock").eeprom
    assert STS.reg("ID").eeprom and XL.reg("Operating_Mode").eeprom and not XL.reg("Torque_Enable").eeprom
    for model in MODELS.values():
        regs = sorted(model.registers.values(), key=lambda r: r.address)
        for a, nxt in zip(regs, regs[1:]):
            assert a.end <= nxt.address, f"{model.name}: {a.name} overlaps {nxt.name}"
        assert regs[-1].end <= model.table_size


def test_model_lookup_and_errors():
    assert model_for("dynamixel", 1200) is XL
    assert model_for("feetech", 777) is STS
    assert model_for("feetech", 1200) is None
    with pytest.raises(KeyError) as info:
        XL.reg("Torque_Limit")
    assert isinstance(info.value, UnknownRegister)
    assert "xl330-m288" in str(info.value) and "Torque_Limit" in str(info.value)
    assert XL.baud_code(1_000_000) == 3 and STS.baud_code(115_200) == 4 and STS.baud_code(1_000_000) == 0
    with pytest.raises(ValueError, match=r"sts3215 cannot run at 9600 bit/s \(supported: 38400"):
        STS.baud_code(9600)
    assert codec_for("feetech") is CODECS["feetech"]
    with pytest.raises(ValueError, match="'herkulex'.*dynamixel, feetech"):
        codec_for("herkulex")
