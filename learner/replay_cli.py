"""`reverie-replay`: the offline toolbox for replay directories (docs/offline.md walks through it).

A thin dispatcher: each verb is one module that adds its parser (`add_parser(sub)`) and runs it
(`args.func(args)`), so verbs are added without touching the others. Every verb reads replay
directories without writing them; the ones that make a replay (filter, merge, split, record) write a
new directory, atomically.
"""

from __future__ import annotations

import argparse
import sys

from learner.formats import cli as formats
from learner.offline import edit, episodes, evaluate, info, plot, record, video
from learner.offline.common import PROG, fail
from learner.offline.reader import ReplayDirError
from learner.offline.select import SelectionError
from learner.viewers import cli as viewers

# each: add_parser(sub) -> sets args.func
VERBS = (info, episodes, plot, video, evaluate, edit, record, formats, viewers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Look into, edit and evaluate Reverie replay directories.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage or help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (ReplayDirError, SelectionError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
