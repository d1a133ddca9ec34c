"""What every `reverie-replay` verb shares: opening the replay it names (skipped files said on stderr)
and the one way of failing (a line naming the problem, exit status 2)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from learner.offline.reader import ReplayDir

PROG = "reverie-replay"


def fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def open_replay(directory: Path) -> ReplayDir:
    """The replay directory, read-only; each skipped file (half-written, corrupt) named on stderr.
    Raises ReplayDirError for a directory that is not a replay or holds nothing readable."""
    replay = ReplayDir(directory)
    for line in replay.warnings():
        say(line)
    return replay


def add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="a replay directory (a run's is LOGDIR/replay)")


def when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
