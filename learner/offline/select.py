"""Choosing episodes, the same way in every verb: by stream, task, time range, acting policy version,
an episode list, completeness. The flags are added once here (`add_selection`) and read once
(`selection_of`); a bad value is a `SelectionError` naming the flag."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from learner.offline.reader import Episode


class SelectionError(ValueError):
    """A selection flag that cannot be understood, with the flag and the expected form."""


@dataclass
class Selection:
    streams: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    versions: tuple[int, int] | None = None
    episodes: tuple[tuple[str | None, int, int], ...] = ()  # (stream or any, first, last) index ranges
    complete: bool = False

    def matches(self, ep: Episode) -> bool:
        if self.streams and ep.stream not in self.streams:
            return False
        if self.tasks and ep.task not in self.tasks:
            return False
        if self.since is not None and (ep.start_time is None or ep.start_time < self.since):
            return False
        if self.until is not None and (ep.start_time is None or ep.start_time >= self.until):
            return False
        lo, hi = self.versions or (0, 2**62)
        if not (lo <= ep.versions[0] and ep.versions[1] <= hi):
            return False
        if self.episodes and not any((s is None or s == ep.stream) and lo <= ep.index <= hi
                                     for s, lo, hi in self.episodes):
            return False
        return not (self.complete and not ep.complete)

    def apply(self, episodes: list[Episode]) -> list[Episode]:
        return [ep for ep in episodes if self.matches(ep)]

    @property
    def empty(self) -> bool:
        return self == Selection()


def parse_time(text: str, flag: str) -> float:
    """Seconds since the epoch, or an ISO date/time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SelectionError(f"{flag} {text!r}: expected seconds since the epoch or an ISO time such as "
                             "2025-06-01T14:30") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def parse_versions(text: str) -> tuple[int, int]:
    """`N` or `LO:HI` (either end may be empty: open)."""
    m = re.fullmatch(r"\s*(\d*)\s*(?::\s*(\d*)\s*)?", text)
    if not m or (not m.group(1) and m.group(2) is None):
        raise SelectionError(f"--versions {text!r}: expected N or LO:HI (policy-weights versions, e.g. 0:40)")
    lo = int(m.group(1)) if m.group(1) else 0
    hi = lo if m.group(2) is None else (int(m.group(2)) if m.group(2) else 2**62)
    return lo, hi


def parse_episodes(text: str) -> tuple[tuple[str | None, int, int], ...]:
    """A comma-separated list of `N`, `N-M`, `STREAM:N` or `STREAM:N-M` (indices as `episodes` lists them)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        stream, _, span = part.rpartition(":")
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", span)
        if not m:
            raise SelectionError(f"--episodes {text!r}: {part!r} is not N, N-M, STREAM:N or STREAM:N-M")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise SelectionError(f"--episodes {text!r}: {part!r} ends before it starts")
        out.append((stream or None, lo, hi))
    if not out:
        raise SelectionError(f"--episodes {text!r}: no episode named")
    return tuple(out)


def add_selection(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("which episodes (all when none is given)")
    g.add_argument("--stream", action="append", default=[], metavar="NAME", help="this stream (repeatable)")
    g.add_argument("--task", action="append", default=[], metavar="NAME", help="this task (repeatable)")
    g.add_argument("--since", metavar="TIME", help="episodes starting at or after TIME (ISO, UTC, or epoch s)")
    g.add_argument("--until", metavar="TIME", help="episodes starting before TIME")
    g.add_argument("--versions", metavar="LO:HI", help="episodes acted on only by policy versions LO..HI")
    g.add_argument("--episodes", metavar="LIST", help="e.g. 3,5-9,arm-1:0-4 (indices as `episodes` lists them)")
    g.add_argument("--complete", action="store_true", help="only episodes seen from start to end")


def selection_of(args: argparse.Namespace) -> Selection:
    return Selection(
        streams=tuple(args.stream), tasks=tuple(args.task),
        since=None if args.since is None else parse_time(args.since, "--since"),
        until=None if args.until is None else parse_time(args.until, "--until"),
        versions=None if args.versions is None else parse_versions(args.versions),
        episodes=() if args.episodes is None else parse_episodes(args.episodes),
        complete=args.complete,
    )
