"""Errors of the servo bus. Every message names the port, the servo id(s) and what happened, so that a
log line alone says which cable, which servo and which request to look at."""

from __future__ import annotations

from collections.abc import Sequence

from core.interface import RobotError


class MotorError(RobotError):
    """Anything that went wrong on a servo bus."""


def _servos(ids: Sequence[int]) -> str:
    if len(ids) == 1:
        return f"servo {ids[0]}"
    return "servos " + ", ".join(str(i) for i in ids)


def _tail(detail: str) -> str:
    return f" ({detail})" if detail else ""


class BusTimeout(MotorError):
    """No (complete) reply in time: `ids` are the servos that did not answer `what` after `tries` tries."""

    def __init__(self, port: str, ids: Sequence[int], what: str, tries: int = 1, detail: str = "") -> None:
        self.port = port
        self.ids = list(ids)
        self.what = what
        self.tries = tries
        count = f" ({tries} tries)" if tries > 1 else ""
        super().__init__(f"{port}: {_servos(self.ids)} did not answer {what}{count}{_tail(detail)}")


class BusCorrupt(MotorError):
    """A reply failed its checksum/CRC or had an impossible length; `id` is None when it could not be read."""

    def __init__(self, port: str, id: int | None, what: str, detail: str = "") -> None:
        self.port = port
        self.id = id
        self.what = what
        who = f"servo {id}" if id is not None else "an unknown servo"
        super().__init__(f"{port}: corrupt reply from {who} to {what}{_tail(detail)}")


class ServoFault(MotorError):
    """A servo set error bits in its status; `faults` are their names (e.g. ["overload", "overheating"]).
    `servo_faults` has every faulty servo of the same request (the first one is `id`)."""

    def __init__(self, port: str, id: int, faults: Sequence[str], what: str = "") -> None:
        self.port = port
        self.id = id
        self.faults = list(faults)
        self.what = what
        self.servo_faults: dict[int, list[str]] = {id: self.faults}
        during = f" in reply to {what}" if what else ""
        super().__init__(f"{port}: servo {id} reports {', '.join(self.faults) or 'an error'}{during}")


class MotorConfigError(MotorError):
    """The bus does not match its configuration (wrong model at an id, unknown register, bad value)."""


class UnknownRegister(MotorConfigError, KeyError):
    """A register name a model does not have; a KeyError too, so dict-style lookups can catch it."""

    def __str__(self) -> str:  # KeyError's own __str__ would quote the message
        return str(self.args[0]) if self.args else ""
