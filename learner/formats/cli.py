"""`reverie-replay export DIR --format lerobot|minari --out PATH` and `reverie-replay import DATASET --out DIR`:
the verbs of this package, added to the `reverie-replay` dispatcher."""

from __future__ import annotations

import argparse
from pathlib import Path

from learner.formats import FormatError
from learner.offline.common import add_dir, fail, open_replay, say
from learner.offline.select import add_selection, selection_of

FORMATS = ("lerobot", "minari")
LEROBOT_IMAGES = ("h264", "lossless", "av1", "png")
MINARI_IMAGES = ("raw", "jpeg")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="episodes as a LeRobotDataset v3.0 or a Minari dataset")
    add_dir(p)
    p.add_argument("--format", choices=FORMATS, default="lerobot", help="the dataset format (default lerobot)")
    p.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="lerobot: the dataset directory to create; minari: the datasets root (what "
                        "MINARI_DATASETS_PATH names), the dataset goes to PATH/DATASET_ID")
    p.add_argument("--dataset-id", help="minari: the dataset's id, (namespace/)name-vN (default "
                                        "reverie/<env>/<replay or run name>-v0)")
    p.add_argument("--fps", type=float, help="frames per second (default: the streams' recorded control rate)")
    p.add_argument("--images", choices=(*LEROBOT_IMAGES, *MINARI_IMAGES),
                   help="lerobot: camera images as h264 video (default, lossy), lossless video, av1 video, or PNG "
                        "in the data files; minari: raw arrays (default, exact) or jpeg")
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
    allowed = MINARI_IMAGES if args.format == "minari" else LEROBOT_IMAGES
    if args.images is not None and args.images not in allowed:
        return fail(f"--images {args.images}: {args.format} takes {', '.join(allowed)}")
    if args.format != "minari" and args.dataset_id is not None:
        return fail("--dataset-id is for --format minari")
    try:
        if args.format == "minari":
            from learner.formats.minari import export_minari

            report = export_minari(replay, episodes, args.out, dataset_id=args.dataset_id, jpeg=args.images == "jpeg")
            report.out = args.out / report.dataset_id
            report.notes.append(f"load it with MINARI_DATASETS_PATH={args.out} and "
                                f"minari.load_dataset({report.dataset_id!r})"
                                + (f"; its environment: {report.env_id}" if report.env_id else ""))
        else:
            from learner.formats.lerobot_export import export_lerobot

            report = export_lerobot(replay, episodes, args.out, fps=args.fps, images=args.images or "h264")
    except FormatError as exc:
        return fail(str(exc))
    for why, n in report.skipped.items():
        say(f"skipped {n} episode(s): {why}")
    for note in report.notes:
        say(note)
    unit = "transition(s)" if args.format == "minari" else "frame(s)"
    print(f"wrote {report.out}: {report.episodes} episode(s), {report.frames} {unit} ({args.format})")
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
