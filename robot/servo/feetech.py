"""Feetech STS/SMS framing: `FF FF | ID | LEN | INST | params | CHK`, CHK = ~(ID + LEN + INST + params).

Status packets carry the error byte where instructions carry the instruction, so both kinds parse
alike. Signed registers are sign-magnitude (a sign bit per register), not two's complement.
"""

from __future__ import annotations

from robot.servo.codec import Codec, CorruptPacket, Packet
from robot.servo.tables import Register

HEADER = b"\xff\xff"
MIN_LEN = 2  # LEN counts the instruction/error byte and the checksum

ERROR_BITS = {0x01: "voltage", 0x02: "angle sensor", 0x04: "overheating", 0x08: "over-current", 0x20: "overload"}


def checksum(body: bytes | bytearray) -> int:
    """~(sum of ID, LEN, INST/ERR and params) & 0xFF."""
    return ~sum(body) & 0xFF


class FeetechCodec(Codec):
    """Packets of Feetech STS/SMS servos (little-endian; the older big-endian SCS series is not supported)."""

    name = "feetech"
    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REBOOT = None
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83
    addr_size = 1

    def _frame(self, id: int, code: int, params: bytes) -> bytes:
        if not 0 <= id <= 0xFE:
            raise ValueError(f"feetech: servo id {id} is outside 0..254")
        if len(params) > 253:
            raise ValueError(f"feetech: {len(params)} parameter bytes do not fit one packet (at most 253)")
        body = bytes([id, len(params) + 2, code]) + bytes(params)
        return HEADER + body + bytes([checksum(body)])

    def instruction(self, id: int, inst: int, params: bytes = b"") -> bytes:
        return self._frame(id, inst, params)

    def status(self, id: int, error: int, params: bytes = b"") -> bytes:
        return self._frame(id, error, params)

    def take(self, buf: bytearray, status: bool) -> Packet | None:
        while True:
            start = buf.find(HEADER)
            if start < 0:
                if buf[-1:] == b"\xff":
                    del buf[:-1]  # may be the first byte of a header
                else:
                    buf.clear()
                return None
            del buf[:start]
            if len(buf) < 4:
                return None
            id, length = buf[2], buf[3]
            if id == 0xFF:
                del buf[:1]  # FF FF FF: the header starts one byte later
                continue
            if length < MIN_LEN:
                del buf[:len(HEADER)]
                raise CorruptPacket(f"feetech: packet from/to id {id} has impossible length {length}",
                                    len(HEADER), id)
            total = 4 + length
            if len(buf) < total:
                return None
            frame = bytes(buf[:total])
            del buf[:total]
            if checksum(frame[2:-1]) != frame[-1]:
                raise CorruptPacket(f"feetech: checksum mismatch in a packet of id {id} ({total} bytes)", total, id)
            return Packet(id, frame[4], frame[5:-1])

    def error_names(self, error: int) -> list[str]:
        return [ERROR_BITS.get(1 << bit, f"error bit {1 << bit:#04x}") for bit in range(8) if error >> bit & 1]

    def encode(self, value: int, reg: Register) -> bytes:
        value = int(value)
        if reg.sign_bit is None:
            return _fit(value, reg, signed=reg.signed)
        magnitude = abs(value)
        if magnitude >= 1 << reg.sign_bit:
            raise ValueError(f"{value} does not fit register {reg.name} (sign-magnitude, sign bit {reg.sign_bit})")
        raw = magnitude | (1 << reg.sign_bit if value < 0 else 0)
        return raw.to_bytes(reg.size, "little")

    def decode(self, data: bytes, reg: Register) -> int:
        if len(data) != reg.size:
            raise ValueError(f"register {reg.name} has {reg.size} bytes, got {len(data)}")
        if reg.sign_bit is None:
            return int.from_bytes(data, "little", signed=reg.signed)
        raw = int.from_bytes(data, "little")
        magnitude = raw & ((1 << reg.sign_bit) - 1)
        return -magnitude if raw >> reg.sign_bit & 1 else magnitude

    def wire_bytes(self, n_params: int, status: bool) -> int:
        # header 2, id 1, len 1, inst/error 1, params, checksum 1
        return 6 + n_params


def _fit(value: int, reg: Register, signed: bool) -> bytes:
    try:
        return value.to_bytes(reg.size, "little", signed=signed)
    except OverflowError:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"{value} does not fit register {reg.name} ({reg.size} bytes, {kind})") from None
