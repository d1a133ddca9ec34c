"""What every servo protocol offers: packet framing, instruction codes and value encoding.

A protocol module (`dynamixel.py`, `feetech.py`) subclasses `Codec` with its framing and quirks;
the bus driver (`bus.py`) and the emulated bus (`emulator.py`) hold all the logic above it, so both
ends of the wire share one implementation of every byte.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from robot.servo.tables import Register


@dataclass(frozen=True)
class Packet:
    """One decoded packet: `code` is the instruction (host -> servo) or the error byte (servo -> host)."""

    id: int
    code: int
    params: bytes


class CorruptPacket(ValueError):
    """A framed packet whose checksum/CRC or length is wrong; `consumed` bytes were dropped from the buffer."""

    def __init__(self, message: str, consumed: int, id: int | None = None) -> None:
        super().__init__(message)
        self.consumed = consumed
        self.id = id


class Codec(abc.ABC):
    """Framing of one protocol. Subclasses set the class attributes and implement the abstract methods."""

    name: str  # "dynamixel" or "feetech"
    BROADCAST = 0xFE
    PING: int
    READ: int
    WRITE: int
    SYNC_READ: int
    SYNC_WRITE: int
    REBOOT: int | None
    addr_size: int  # bytes of an address / length field in read, write and sync instructions

    @abc.abstractmethod
    def instruction(self, id: int, inst: int, params: bytes = b"") -> bytes:
        """A complete instruction packet (header, stuffing, checksum)."""

    @abc.abstractmethod
    def status(self, id: int, error: int, params: bytes = b"") -> bytes:
        """A complete status (reply) packet."""

    @abc.abstractmethod
    def take(self, buf: bytearray, status: bool) -> Packet | None:
        """Remove and return the first complete packet in `buf` (leading garbage is dropped).

        `status` says which kind is expected (a status packet has an error byte where an instruction
        packet has its instruction). Returns None if `buf` holds no complete packet yet; raises
        `CorruptPacket` (after removing the bad bytes) if a framed packet fails its check.
        """

    @abc.abstractmethod
    def error_names(self, error: int) -> list[str]:
        """Readable names of the bits set in a status error byte (empty when none)."""

    @abc.abstractmethod
    def encode(self, value: int, reg: Register) -> bytes:
        """A register value as bytes on the wire (little-endian; the protocol's sign convention)."""

    @abc.abstractmethod
    def decode(self, data: bytes, reg: Register) -> int:
        """Bytes read from a register back to a signed/unsigned integer."""

    @abc.abstractmethod
    def wire_bytes(self, n_params: int, status: bool) -> int:
        """Bytes on the wire of a packet with `n_params` parameter bytes (before any byte stuffing).
        The bus driver computes per-call timeouts from this and the baud rate."""

    # Builders shared by both protocols: addresses and lengths are `addr_size` bytes, little-endian.
    def _field(self, value: int) -> bytes:
        return value.to_bytes(self.addr_size, "little")

    def ping(self, id: int) -> bytes:
        return self.instruction(id, self.PING)

    def read(self, id: int, address: int, size: int) -> bytes:
        return self.instruction(id, self.READ, self._field(address) + self._field(size))

    def write(self, id: int, address: int, data: bytes) -> bytes:
        return self.instruction(id, self.WRITE, self._field(address) + data)

    def sync_read(self, address: int, size: int, ids: list[int]) -> bytes:
        return self.instruction(self.BROADCAST, self.SYNC_READ, self._field(address) + self._field(size) + bytes(ids))

    def sync_write(self, address: int, size: int, data: dict[int, bytes]) -> bytes:
        wrong = {i: len(d) for i, d in data.items() if len(d) != size}
        if wrong:  # a short block would shift every later servo's data: refuse rather than send garbage
            raise ValueError(f"sync write of {size}-byte values at address {address}: servo(s) {wrong} given "
                             "data of another length")
        body = b"".join(bytes([i]) + d for i, d in data.items())
        return self.instruction(self.BROADCAST, self.SYNC_WRITE, self._field(address) + self._field(size) + body)
