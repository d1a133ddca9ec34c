"""`reverie-replay view DIR --save FILE.rrd | --connect [URL] | --spawn`: a replay in the rerun viewer
(`rerun_replay`); the verb of this package, added to the `reverie-replay` dispatcher."""

from __future__ import annotations

import argparse
from pathlib import Path

from learner.formats import FormatError
from learner.offline.common import add_dir, fail, open_replay
from learner.offline.select import add_selection, selection_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="episodes in the rerun viewer: images, proprioception, actions, rewards")
    add_dir(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--save", type=Path, metavar="FILE.rrd", help="write a recording (open it with `rerun FILE`)")
    where.add_argument("--connect", nargs="?", const="", metavar="URL",
                       help="stream to a running viewer (default rerun+http://127.0.0.1:9876/proxy)")
    where.add_argument("--spawn", action="store_true", help="start a viewer and stream to it")
    p.add_argument("--jpeg", type=int, metavar="QUALITY", help="store camera images as JPEG (1-100): smaller files")
    add_selection(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from learner.viewers.rerun_replay import view

    if args.jpeg is not None and not 1 <= args.jpeg <= 100:
        return fail(f"--jpeg {args.jpeg}: expected a quality from 1 to 100")
    replay = open_replay(args.directory)
    episodes = selection_of(args).apply(replay.episodes())
    if not episodes:
        return fail(f"{args.directory}: no episode matches the selection")
    try:
        report = view(replay, episodes, save=args.save, connect=args.connect, spawn=args.spawn,
                      jpeg_quality=args.jpeg)
    except FormatError as exc:
        return fail(str(exc))
    target = args.save or ("a spawned viewer" if args.spawn else args.connect or "the viewer")
    print(f"{report.episodes} episode(s), {report.steps} step(s), {report.images} image(s) -> {target}")
    return 0
