"""Dynamixel Protocol 2.0 framing: `FF FF FD 00 | ID | LEN | INST | params | CRC-16`.

Within INST..params every `FF FF FD` is sent as `FF FF FD FD` so that a header can never appear
inside a packet; LEN counts the stuffed bytes and the CRC covers them, so the receiver checks the CRC
first and un-stuffs after.
"""

from __future__ import annotations

from robot.servo.codec import Codec, CorruptPacket, Packet
from robot.servo.tables import Register

HEADER = b"\xff\xff\xfd\x00"
STATUS = 0x55  # the instruction byte of every status packet
MAX_ID = 252
MAX_LEN = 4096  # longer LEN fields are noise, not packets (the largest we send is a few hundred bytes)

RESULT_ERRORS = {1: "result fail", 2: "instruction error", 3: "CRC error", 4: "data range error",
                 5: "data length error", 6: "data limit error", 7: "access error"}
HARDWARE_ALERT = 0x80
# Hardware_Error_Status bits (what the hardware alert means)
HARDWARE_ERRORS = {0: "input voltage", 2: "overheating", 3: "motor encoder", 4: "electrical shock", 5: "overload"}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/BUYPASS (poly 0x8005, init 0, MSB first, no reflection, no final XOR)."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def stuff(payload: bytes) -> bytes:
    """Insert an FD after every FF FF FD so no header appears inside a packet."""
    if b"\xff\xff\xfd" not in payload:
        return payload
    out = bytearray()
    for byte in payload:
        out.append(byte)
        if byte == 0xFD and out[-3:-1] == b"\xff\xff":  # the payload's own FF FF (an inserted FD is never FF)
            out.append(0xFD)
    return bytes(out)


def unstuff(payload: bytes) -> bytes:
    """Drop the FD that follows every FF FF FD (the inverse of `stuff`)."""
    if b"\xff\xff\xfd\xfd" not in payload:
        return payload
    out = bytearray()
    skip = False
    for byte in payload:
        if skip:
            skip = False
            if byte == 0xFD:
                continue
        out.append(byte)
        if byte == 0xFD and out[-3:-1] == b"\xff\xff":
            skip = True
    return bytes(out)


def hardware_error_names(status: int) -> list[str]:
    """Names of the bits set in Hardware_Error_Status (what a 'hardware alert' was about)."""
    return [HARDWARE_ERRORS.get(bit, f"hardware error bit {bit}") for bit in range(8) if status >> bit & 1]


class DynamixelCodec(Codec):
    """Protocol 2.0 packets of Dynamixel X-series servos."""

    name = "dynamixel"
    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REBOOT = 0x08
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83
    addr_size = 2

    def _frame(self, id: int, payload: bytes) -> bytes:
        if not 0 <= id <= 0xFE:
            raise ValueError(f"dynamixel: servo id {id} is outside 0..254")
        body = stuff(payload)
        head = HEADER + bytes([id]) + (len(body) + 2).to_bytes(2, "little") + body
        return head + crc16(head).to_bytes(2, "little")

    def instruction(self, id: int, inst: int, params: bytes = b"") -> bytes:
        return self._frame(id, bytes([inst]) + bytes(params))

    def status(self, id: int, error: int, params: bytes = b"") -> bytes:
        return self._frame(id, bytes([STATUS, error]) + bytes(params))

    def take(self, buf: bytearray, status: bool) -> Packet | None:
        while True:
            start = buf.find(HEADER)
            if start < 0:
                _keep_header_prefix(buf)
                return None
            del buf[:start]
            if len(buf) < 7:
                return None
            id = buf[4]
            length = int.from_bytes(buf[5:7], "little")
            if id > MAX_ID and id != self.BROADCAST:
                del buf[:1]  # not a packet after all: look for the next header
                continue
            if not 3 <= length <= MAX_LEN:
                del buf[:len(HEADER)]
                raise CorruptPacket(f"dynamixel: packet from/to id {id} has impossible length {length}",
                                    len(HEADER), id)
            total = 7 + length
            if len(buf) < total:
                return None
            frame = bytes(buf[:total])
            del buf[:total]
            sent = int.from_bytes(frame[-2:], "little")
            if crc16(frame[:-2]) != sent:
                raise CorruptPacket(f"dynamixel: CRC mismatch in a packet of id {id} ({total} bytes)", total, id)
            payload = unstuff(frame[7:-2])
            is_status = payload[0] == STATUS
            if is_status != status:
                continue  # the other kind (an echo or another host's instruction): not ours to parse
            if status:
                if len(payload) < 2:
                    raise CorruptPacket(f"dynamixel: status of id {id} has no error byte", total, id)
                return Packet(id, payload[1], payload[2:])
            return Packet(id, payload[0], payload[1:])

    def error_names(self, error: int) -> list[str]:
        names = []
        if error & HARDWARE_ALERT:
            names.append("hardware alert")
        result = error & 0x7F
        if result:
            names.append(RESULT_ERRORS.get(result, f"error {result}"))
        return names

    def encode(self, value: int, reg: Register) -> bytes:
        try:
            return int(value).to_bytes(reg.size, "little", signed=reg.signed)
        except OverflowError:
            kind = "signed" if reg.signed else "unsigned"
            raise ValueError(f"{value} does not fit register {reg.name} ({reg.size} bytes, {kind})") from None

    def decode(self, data: bytes, reg: Register) -> int:
        if len(data) != reg.size:
            raise ValueError(f"register {reg.name} has {reg.size} bytes, got {len(data)}")
        return int.from_bytes(data, "little", signed=reg.signed)

    def wire_bytes(self, n_params: int, status: bool) -> int:
        # header 4, id 1, len 2, inst 1, (error 1), params, crc 2
        return 10 + n_params + (1 if status else 0)


def _keep_header_prefix(buf: bytearray) -> None:
    """Drop garbage, keeping a tail that may be the start of a header still arriving."""
    for keep in (3, 2, 1):
        if len(buf) >= keep and buf[-keep:] == HEADER[:keep]:
            del buf[:-keep]
            return
    buf.clear()
