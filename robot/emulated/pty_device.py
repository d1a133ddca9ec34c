"""What every device emulated on a pseudo-terminal shares (the servo bus, the BNO055 IMU).

The host opens `port` with pyserial as it would a USB adapter; a thread answers on the master
side. The baud rate the host sets is readable from the master (`host_baud`), so an emulated
device can refuse to understand a host talking at the wrong rate, as real hardware does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
import tty
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

POLL_S = 0.005  # longest the serving thread sleeps: how fast it notices close() and its own timers
STALE_S = 0.1  # an incomplete request older than this is dropped, as a device's parser times out
TCGETS2 = 0x802C542A  # Linux ioctl: termios2, whose c_ospeed holds any baud rate as a number


def host_baud(fd: int) -> int:
    """The baud rate the host set on the pty (bit/s); 0 if unknown."""
    try:
        raw = bytearray(44)
        fcntl.ioctl(fd, TCGETS2, raw)
        return struct.unpack_from("=I", raw, 40)[0]  # c_ospeed
    except OSError:
        speed = termios.tcgetattr(fd)[5]
        return _TERMIOS_BAUDS.get(speed, 0)


_TERMIOS_BAUDS = {getattr(termios, n): int(n[1:]) for n in dir(termios) if n[:1] == "B" and n[1:].isdigit()}


class PtyDevice:
    """A pseudo-terminal and the thread that serves it. Subclasses implement `_drain` (answer every whole
    request at the front of the buffer) and may hook `_hears`, `_on_stale`, `_on_tick` and `_count`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing: bytes pass as they are
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)

    def _serve(self) -> None:
        """Gather the host's bytes and answer whole requests. An incomplete request left for STALE_S is
        dropped (`_on_stale`). A bug while answering is logged and counted, never fatal to the device."""
        buf = bytearray()
        last_rx = time.monotonic()
        while not self._stop.is_set():
            data = self._read_some()
            now = time.monotonic()
            if data and self._hears():
                buf += data
                last_rx = now
            elif buf and now - last_rx > STALE_S:
                buf.clear()
                self._on_stale()
            try:
                self._on_tick(now)
                self._drain(buf)
            except Exception:
                log.exception("%s on %s: error while serving", self._name, self.port)
                self._count("internal_errors")
                buf.clear()

    def _drain(self, buf: bytearray) -> None:
        raise NotImplementedError

    def _hears(self) -> bool:
        """False while the device ignores the line (a silent-device fault)."""
        return True

    def _on_stale(self) -> None:
        """An incomplete request timed out (after the buffer was cleared)."""

    def _on_tick(self, now: float) -> None:
        """Timers of the device, run on every pass of the serving loop."""

    def _count(self, key: str, n: int = 1) -> None:
        """Count an event in the subclass's statistics."""

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"{self._name} {self.port}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and close the pty. Safe to call repeatedly."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.error("%s on %s: thread did not stop", self._name, self.port)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _read_some(self) -> bytes:
        """What the host sent since the last call (waits at most POLL_S); b"" when nothing came."""
        try:
            ready, _, _ = select.select([self._master], [], [], POLL_S)
            return os.read(self._master, 4096) if ready else b""
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._stop.wait(POLL_S)  # no one has the port open
            return b""

    def _write_all(self, data: bytes, give_up_s: float = 1.0) -> bool:
        """Write everything, waiting while the pty is full; False if the host read nothing for `give_up_s`."""
        deadline = time.monotonic() + give_up_s
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                view = view[os.write(self._master, view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                select.select([], [self._master], [], POLL_S)
        return True
