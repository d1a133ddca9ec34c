"""The robot's bounded on-disk spool of experience chunks the learner has not acknowledged yet.

Why a spool: the learner may be down, restarting or unreachable for minutes; experience the robot
recorded meanwhile must survive that and a robot restart too, and must never be dropped silently.
Each chunk is one file written atomically (temp file, fsync, rename); the learner's cumulative ack
deletes files. When the spool reaches its byte limit `put` raises `SpoolFull` so the caller can stop
the robot and say why, instead of throwing data away; the few chunks recorded until the robot has
stopped are then written past the limit (`past_limit`), so that none is lost.

File format (no pickle): magic b"RVSP1", uint32 frame count, one uint64 length per frame, then the
frames back to back, all little-endian. Names are the zero-padded seq, so a listing sorts by seq.
The seq counter lives in a small file too, so seqs are never reused even after every chunk was acked.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from core.atomic import atomic_write_bytes, fsync_dir

MAGIC = b"RVSP1"
SUFFIX = ".rvsp"
COUNTER_FILE = "next_seq"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
_SEQ_DIGITS = 12
_MAX_FRAMES = 1 << 16


class SpoolFull(RuntimeError):
    """The spool has no room for another chunk: the learner has not acknowledged enough."""


class SpoolCorrupt(ValueError):
    """A spooled file is not a valid chunk (it has been moved aside as *.corrupt)."""


def _nbytes(frame: bytes | memoryview) -> int:
    return memoryview(frame).nbytes


def _header(lengths: Sequence[int]) -> bytes:
    return MAGIC + _COUNT.pack(len(lengths)) + b"".join(_LENGTH.pack(n) for n in lengths)


def _read_lengths(f, size: int) -> list[int]:
    """Validate a chunk file's header against its size; return the frame lengths (ValueError if bad)."""
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic[:8]!r}")
    raw = f.read(_COUNT.size)
    if len(raw) != _COUNT.size:
        raise ValueError("truncated before the frame count")
    (count,) = _COUNT.unpack(raw)
    if count > _MAX_FRAMES:
        raise ValueError(f"frame count {count} is implausible")
    raw = f.read(count * _LENGTH.size)
    if len(raw) != count * _LENGTH.size:
        raise ValueError(f"truncated inside the header ({count} frames)")
    lengths = [n for (n,) in _LENGTH.iter_unpack(raw)]
    expected = len(MAGIC) + _COUNT.size + count * _LENGTH.size + sum(lengths)
    if expected != size:
        raise ValueError(f"header says {expected} bytes, file has {size} (truncated or extended)")
    return lengths


class Spool:
    """Chunks on disk, by seq, until acknowledged; bounded by `max_bytes`; survives restarts."""

    def __init__(self, directory: Path, max_bytes: int, log: logging.Logger | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.log = log or logging.getLogger(__name__)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[int, int] = {}  # seq -> file size
        self.next_seq = 0
        self._scan()

    # --- public ----------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Total size of the spooled chunk files."""
        return sum(self._sizes.values())

    @property
    def count(self) -> int:
        """Number of spooled (unacknowledged) chunks."""
        return len(self._sizes)

    def pending(self) -> list[int]:
        """Seqs on disk, oldest first."""
        return sorted(self._sizes)

    def put(self, seq: int, frames: Sequence[bytes | memoryview], *, past_limit: bool = False) -> None:
        """Store one chunk durably; seq must be `next_seq`; SpoolFull (writing nothing) if over the limit,
        unless `past_limit` (the robot has stopped: the limit has done its job, the chunk must not be lost)."""
        if seq != self.next_seq:
            raise ValueError(f"spool {self.directory}: put seq {seq}, expected next_seq {self.next_seq}")
        lengths = [_nbytes(f) for f in frames]
        header = _header(lengths)
        size = len(header) + sum(lengths)
        if self.bytes + size > self.max_bytes and not past_limit:
            raise SpoolFull(
                f"spool {self.directory} is full: {self.count} chunks, {self.bytes} bytes + {size} for seq {seq} "
                f"> limit {self.max_bytes} bytes (the learner has not acknowledged them)"
            )
        path = self._path(seq)
        atomic_write_bytes(path, [header, *frames], prefix=f".tmp-{path.name}-")
        self._sizes[seq] = size
        self.next_seq = seq + 1

    def ack(self, upto: int) -> int:
        """Delete every chunk with seq <= upto (cumulative ack); return how many were removed."""
        done = [s for s in self._sizes if s <= upto]
        if not done:
            return 0
        # Persist the counter before deleting, so seqs stay unique even when the spool empties.
        self._write_counter()
        for seq in done:
            self._path(seq).unlink(missing_ok=True)
            del self._sizes[seq]
        fsync_dir(self.directory)
        return len(done)

    def skip_to(self, seq: int) -> None:
        """Raise next_seq to `seq` (persisted): seqs a peer has already seen must never be reused."""
        if seq > self.next_seq:
            self.next_seq = seq
            self._write_counter()

    def load(self, seq: int) -> list[bytes]:
        """The frames of a spooled chunk; a file found bad is moved aside and SpoolCorrupt raised."""
        if seq not in self._sizes:
            raise KeyError(f"spool {self.directory}: no chunk with seq {seq}")
        path = self._path(seq)
        try:
            with open(path, "rb") as f:
                lengths = _read_lengths(f, os.fstat(f.fileno()).st_size)
                frames = [f.read(n) for n in lengths]
        except (OSError, ValueError) as e:
            self._sizes.pop(seq, None)
            moved = self._move_aside(path, str(e))
            raise SpoolCorrupt(f"spool chunk {path} (seq {seq}) is unreadable: {e}; moved to {moved}") from e
        return frames

    # --- internals -------------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:0{_SEQ_DIGITS}d}{SUFFIX}"

    def _move_aside(self, path: Path, why: str) -> Path | None:
        target = path.with_name(path.name + ".corrupt")
        n = 1
        while target.exists():
            target = path.with_name(f"{path.name}.{n}.corrupt")
            n += 1
        try:
            os.replace(path, target)
        except OSError as e:
            self.log.warning("spool file %s is bad (%s) and could not be moved aside: %s", path, why, e)
            return None
        self.log.warning("spool file %s is bad (%s): moved aside to %s", path, why, target)
        return target

    def _scan(self) -> None:
        highest = -1
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.endswith(".corrupt"):
                highest = max(highest, int(name[:_SEQ_DIGITS]) if name[:_SEQ_DIGITS].isdigit() else -1)
                continue
            if name.startswith(".tmp-") and path.is_file():
                # A write interrupted by a crash: never acknowledged to the caller, but keep it for inspection.
                self._move_aside(path, "left over from an interrupted write")
                continue
            seq_text = name.split(".", 1)[0]
            if not seq_text.isdigit():
                continue
            seq = int(seq_text)
            highest = max(highest, seq)  # a corrupt file's seq was used too: never reuse it
            if name != f"{seq_text}{SUFFIX}" or len(seq_text) != _SEQ_DIGITS:
                continue
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    _read_lengths(f, size)
            except (OSError, ValueError) as e:
                self._move_aside(path, str(e))
                continue
            self._sizes[seq] = size
        self.next_seq = max(highest + 1, self._read_counter())
        if self._sizes:
            self.log.info(
                "spool %s: %d unacknowledged chunks (%d bytes) from before, seq %d..%d",
                self.directory, self.count, self.bytes, min(self._sizes), max(self._sizes),
            )

    def _read_counter(self) -> int:
        path = self.directory / COUNTER_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0
        try:
            value = int(text.strip())
            if value < 0:
                raise ValueError(f"negative value {value}")
        except ValueError as e:
            self._move_aside(path, f"not a seq counter: {e}")
            return 0
        return value

    def _write_counter(self) -> None:
        path = self.directory / COUNTER_FILE
        atomic_write_bytes(path, f"{self.next_seq}\n".encode(), prefix=f".tmp-{COUNTER_FILE}-")
