"""The latency timer of an FTDI USB serial adapter: read it, set it, warn when it slows the servo bus.

An FTDI chip holds received bytes until its buffer fills or the latency timer runs out; the ftdi_sio
driver starts it at 16 ms, so every servo round trip takes at least 16 ms and a 50 Hz control loop of a
six-servo arm cannot keep up. 1 ms is the recommended value. Linux exposes the timer at
/sys/bus/usb-serial/devices/<ttyUSBn>/latency_timer (writable by root or through a udev rule). Other
adapters (CH340, CP210x, CDC-ACM boards at /dev/ttyACM*) have no such timer and nothing to tune.

`sysfs` is the root of the sysfs tree ("/sys"); tests pass a directory laid out the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RECOMMENDED_MS = 1
MAX_MS = 255  # the FTDI chips' latency timer is one byte, 1..255 ms
UDEV_RULE = 'ACTION=="add", SUBSYSTEM=="usb-serial", DRIVER=="ftdi_sio", ATTR{latency_timer}="1"'
UDEV_FILE = "/etc/udev/rules.d/99-ftdi-latency.rules"


class LatencyError(OSError):
    """The latency timer file exists but holds no number, or did not take the value written."""


def tty_name(port: str) -> str:
    """The kernel's name of `port` (ttyUSB0) after resolving symlinks such as /dev/serial/by-id/..."""
    return os.path.basename(os.path.realpath(port))


def latency_path(port: str, sysfs: str | os.PathLike[str] = "/sys") -> Path:
    """Where the kernel exposes `port`'s latency timer (the file exists only for FTDI adapters)."""
    return Path(sysfs) / "bus" / "usb-serial" / "devices" / tty_name(port) / "latency_timer"


def latency_timer(port: str, sysfs: str | os.PathLike[str] = "/sys") -> int | None:
    """`port`'s latency timer in ms; None when the adapter has none (not FTDI, a pty, a pyserial URL)."""
    if "://" in port:
        return None
    path = latency_path(port, sysfs)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise LatencyError(f"{path} (latency timer of {port}) holds {text.strip()!r}, not a number of ms") from None


def set_latency_timer(port: str, ms: int, sysfs: str | os.PathLike[str] = "/sys") -> None:
    """Write `ms` to `port`'s latency timer and check it took. PermissionError without root or a udev
    rule (see `fix_commands`); FileNotFoundError when the adapter has no timer."""
    if not 1 <= ms <= MAX_MS:
        raise ValueError(f"latency timer {ms} ms for {port}: FTDI adapters take 1..{MAX_MS} ms")
    path = latency_path(port, sysfs)
    if not path.exists():
        raise FileNotFoundError(f"{port} ({tty_name(port)}) has no latency timer at {path}: not an FTDI adapter")
    with open(path, "w") as f:  # sysfs takes one write of the whole value
        f.write(f"{ms}\n")
    got = latency_timer(port, sysfs)
    if got != ms:
        raise LatencyError(f"wrote {ms} to {path} (latency timer of {port}) but it reads back {got}")


def fix_commands(port: str, ms: int = RECOMMENDED_MS, sysfs: str | os.PathLike[str] = "/sys") -> list[str]:
    """Shell lines that set the timer now (as root) and for every future plug-in (a udev rule)."""
    rule = UDEV_RULE.replace('="1"', f'="{ms}"')
    return [f"echo {ms} | sudo tee {latency_path(port, sysfs)}",
            f"echo '{rule}' | sudo tee {UDEV_FILE}",
            "sudo udevadm control --reload-rules && sudo udevadm trigger"]


def warn_if_slow(port: str, sysfs: str | os.PathLike[str] = "/sys") -> int | None:
    """For start-up: log a warning, with the fix, when `port`'s latency timer is above RECOMMENDED_MS.
    Returns the timer (None: no timer). Never raises: a check that cannot read the timer only says so."""
    try:
        ms = latency_timer(port, sysfs)
    except OSError as exc:
        log.warning("could not read the latency timer of %s: %s", port, exc)
        return None
    if ms is not None and ms > RECOMMENDED_MS:
        log.warning("%s: USB latency timer is %d ms (every servo round trip waits for it); set it to %d ms: "
                    "reverie-robot latency --port %s --set-ms %d, or: %s", port, ms, RECOMMENDED_MS, port,
                    RECOMMENDED_MS, fix_commands(port, RECOMMENDED_MS, sysfs)[0])
    return ms
