"""`reverie-replay export DIR --format lerobot|minari --out PATH` and `reverie-replay import DATASET --out DIR`:
the verbs of this package, added to the `reverie-replay` dispatcher."""

from __future__ import annotations

import argparse
from pathlib import Path

from learner.formats import FormatError
from learner.offline.common import add_dir, fail, open_replay, say
from learner.offline.select import add_selection, selection_of

FORMATS = ("lerobot",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="episodes as a LeRobotDataset v3.0")
    add_dir(p)
    p.add_argument("--format", choices=FORMATS, default="lerobot", help="the dataset format (default lerobot)")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="the dataset directory to create")
    p.add_argument("--fps", type=float, help="frames per second (default: the streams' recorded control rate)")
    p.add_argument("--images", default="h264", choices=("h264", "lossless", "av1", "png"),
                   help="camera images as h264 video (default, lossy), lossless video, av1 video, or PNG in the "
                        "data files")
    add_selection(p)
    p.set_defaults(func=run_export)
    q = sub.add_parser("import", help="a LeRobotDataset v3.0 into a new replay directory")
    q.add_argument("dataset", type=Path, metavar="DATASET", help="a LeRobotDataset v3.0 directory (meta/, data/)")
    q.add_argument("--out", type=Path, required=True, metavar="DIR", help="the replay directory to create")
    q.add_argument("--chunk-length", type=int, default=1024, help="steps per chunk file (default 1024)")
    q.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    replay = open_replay(args.directory)
    episodes = selection_of(args).apply(replay.episodes())
    if not episodes:
        return fail(f"{args.directory}: no episode matches the selection")
    from learner.formats.lerobot_export import export_lerobot

    try:
        report = export_lerobot(replay, episodes, args.out, fps=args.fps, images=args.images)
    except FormatError as exc:
        return fail(str(exc))
    for why, n in report.skipped.items():
        say(f"skipped {n} episode(s): {why}")
    for note in report.notes:
        say(note)
    print(f"wrote {report.out}: {report.episodes} episode(s), {report.frames} frame(s) ({args.format})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from learner.formats.lerobot_import import import_lerobot

    if args.chunk_length < 1:
        return fail(f"--chunk-length {args.chunk_length}: must be >= 1")
    try:
        report = import_lerobot(args.dataset, args.out, chunk_length=args.chunk_length)
    except FormatError as exc:
        return fail(str(exc))
    for note in report.notes:
        say(note)
    streams = ", ".join(repr(s) for s in report.streams)
    print(f"wrote {report.out}: {report.episodes} episode(s), {report.steps} step(s), stream(s) {streams}")
    return 0
