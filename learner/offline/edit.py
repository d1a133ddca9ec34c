"""`reverie-replay filter | merge | split`: new replay directories made of whole episodes of others, chosen
by stream, task, time range, policy version or an episode list; the originals are only read.

The output is written into a hidden directory beside the target and renamed into place when complete, so
the target either does not exist or holds a whole, readable replay (chunk files, index.json and the kept
streams' streams.json). Rows keep their values, times and policy versions exactly; the chunks are new
(fresh names and uuids, cut at `--chunk-length`) and carry no robot position (a robot never feeds them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import fsync_dir
from core.layout import StepLayout
from learner.offline.common import add_dir, open_replay, say
from learner.offline.reader import Episode, ReplayDir, ReplayDirError
from learner.offline.select import SelectionError, add_selection, selection_of
from learner.replay.chunk_file import TIME, VERSION, ChunkMeta, write_chunk
from learner.replay.describe import write_descriptions
from learner.replay.index import entry_for, write_index

CHUNK_LENGTH = 1024


class ReplayWriter:
    """Writes episodes into a new replay directory, stream by stream, as chunk files of `chunk_length`
    rows (a chunk has one task: a task change starts a new one)."""

    def __init__(self, directory: Path, chunk_length: int = CHUNK_LENGTH, compress: bool = False) -> None:
        self.directory, self.chunk_length, self.compress = directory, chunk_length, compress
        directory.mkdir(parents=True)
        self.seq = 0
        self.prev: dict[str, str] = {}
        # stream -> (task, row parts not yet written, their abandoned rows)
        self.open: dict[str, tuple[str, list[dict[str, np.ndarray]], list[int]]] = {}
        self.entries: list[dict[str, Any]] = []
        self.descriptions: dict[str, dict[str, Any]] = {}
        self.layout: StepLayout | None = None
        self.steps = 0
        self.episodes = 0

    def add(self, replay: ReplayDir, ep: Episode, stream: str | None = None) -> None:
        """Append one episode (all its keys, times and versions) to `stream` (default: its own)."""
        stream = stream or ep.stream
        steps = replay.steps(ep)
        layout = StepLayout.from_rows({k: v for k, v in steps.items() if k not in (TIME, VERSION)})
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ReplayDirError(f"{replay.directory}: episode {ep.key} has another step layout than the episodes "
                                 f"before it ({_layout_text(layout)} vs {_layout_text(self.layout)}): replays of "
                                 "different robots or tasks cannot share a directory")
        if stream in self.open and self.open[stream][0] != ep.task:
            self._write(stream)
        task, parts, abandoned = self.open.setdefault(stream, (ep.task, [], []))
        held = sum(len(p[TIME]) for p in parts)
        if ep.end == "abandoned":
            abandoned.append(held + ep.length - 1)
        parts.append(steps)
        self.steps += ep.length
        self.episodes += 1
        if desc := replay.descriptions.get(ep.stream):
            self.descriptions.setdefault(stream, desc)
        while sum(len(p[TIME]) for p in self.open[stream][1]) >= self.chunk_length:
            self._write(stream, self.chunk_length)

    def gap(self, stream: str) -> None:
        """What follows in `stream` does not continue what came before (another source)."""
        if stream in self.open:
            self._write(stream)
        self.prev.pop(stream, None)

    def _write(self, stream: str, limit: int | None = None) -> None:
        task, parts, abandoned = self.open.pop(stream)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(rows[TIME]) if limit is None else min(limit, len(rows[TIME]))
        meta = ChunkMeta.create(stream, task, self.seq, self.prev.get(stream, ""))
        meta.length = n
        meta.abandoned = tuple(r for r in abandoned if r < n)
        self.seq += 1
        steps = {k: v for k, v in rows.items() if k not in (TIME, VERSION)}
        path = self.directory / meta.name
        write_chunk(path, meta, steps, rows[TIME], rows[VERSION], self.compress)
        self.entries.append(entry_for(path, meta))
        self.prev[stream] = meta.uuid
        if n < len(rows[TIME]):
            rest = {k: v[n:] for k, v in rows.items()}
            self.open[stream] = (task, [rest], [r - n for r in abandoned if r >= n])

    def close(self) -> None:
        for stream in list(self.open):
            self._write(stream)
        write_index(self.directory, self.entries)
        if self.descriptions:
            write_descriptions(self.directory, self.descriptions)


def _layout_text(layout: StepLayout) -> str:
    return ", ".join(f"{k} {f.dtype.name}{list(f.shape)}" for k, f in layout.items())


def write_atomically(out: Path, fill: Any, chunk_length: int, compress: bool) -> ReplayWriter:
    """Run `fill(writer)` on a hidden directory beside `out`, then rename it to `out` (which must not exist)."""
    out = Path(out)
    if out.exists():
        raise ReplayDirError(f"{out}: already exists; the output must be a new directory (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        writer = ReplayWriter(tmp, chunk_length, compress)
        fill(writer)
        writer.close()
        if writer.steps == 0:
            raise SelectionError("no episode matches the selection: nothing written (see `reverie-replay episodes`)")
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return writer


def _check_apart(sources: list[Path], outs: list[Path]) -> None:
    for out in outs:
        for src in sources:
            if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
                raise ReplayDirError(f"{out}: inside the source replay {src}; write the output elsewhere")


def _done(writer: ReplayWriter, out: Path) -> None:
    print(f"{out}: {writer.episodes} episode(s), {writer.steps} steps in {len(writer.entries)} chunk file(s), "
          f"{len(writer.prev)} stream(s)")


# --- the verbs -------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("filter", help="the selected episodes into a new replay directory")
    add_dir(f)
    f.add_argument("--out", type=Path, required=True, metavar="NEW_DIR", help="the new replay directory")
    add_selection(f)
    _output_flags(f)
    f.set_defaults(func=run_filter)

    m = sub.add_parser("merge", help="several replay directories into a new one")
    m.add_argument("directories", type=Path, nargs="+", metavar="DIR")
    m.add_argument("--out", type=Path, required=True, metavar="NEW_DIR", help="the new replay directory")
    _output_flags(m)
    m.set_defaults(func=run_merge)

    s = sub.add_parser("split", help="the selected episodes into one new directory, the others into another")
    add_dir(s)
    s.add_argument("--into", type=Path, nargs=2, required=True, metavar=("SELECTED", "REST"),
                   help="two new replay directories")
    s.add_argument("--fraction", type=float, metavar="F",
                   help="of each stream's selected episodes, the first F (0 < F < 1) go to SELECTED, the rest to REST")
    add_selection(s)
    _output_flags(s)
    s.set_defaults(func=run_split)


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-length", type=int, default=CHUNK_LENGTH, metavar="N",
                   help=f"steps per chunk file written (default {CHUNK_LENGTH})")
    p.add_argument("--compress", action="store_true", help="write compressed chunk files")


def _chunk_length(args: argparse.Namespace) -> int:
    if args.chunk_length < 1:
        raise SelectionError(f"--chunk-length {args.chunk_length}: expected a number of steps >= 1")
    return args.chunk_length


def run_filter(args: argparse.Namespace) -> int:
    replay = open_replay(args.directory)
    _check_apart([args.directory], [args.out])
    chosen = selection_of(args).apply(replay.episodes())
    writer = write_atomically(args.out, lambda w: [w.add(replay, ep) for ep in chosen], _chunk_length(args),
                              args.compress)
    _done(writer, args.out)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    replays = [open_replay(d) for d in args.directories]
    _check_apart(args.directories, [args.out])
    seen = {}
    for r in replays:
        for path, meta in r.chunks:
            if meta.uuid in seen:
                raise ReplayDirError(f"{path} and {seen[meta.uuid]} are the same chunk: the inputs overlap (a replay "
                                     "given twice, or a copy of one)")
            seen[meta.uuid] = path

    def fill(w: ReplayWriter) -> None:
        for i, r in enumerate(replays):
            names = {}
            for stream in r.streams:
                name = stream
                other = w.descriptions.get(stream)
                mine = r.descriptions.get(stream)
                if other is not None and mine is not None and _differs(other, mine):
                    name = f"{stream}@{i + 1}"
                    say(f"stream {stream!r} of {r.directory} is described differently from the one before: "
                        f"kept as stream {name!r}")
                names[stream] = name
                w.gap(name)  # another source: its episodes do not continue the previous one's
            for ep in r.episodes():
                w.add(r, ep, names[ep.stream])

    writer = write_atomically(args.out, fill, _chunk_length(args), args.compress)
    _done(writer, args.out)
    return 0


def _differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keep = ("observations", "action", "control_hz", "task")
    return {k: a.get(k) for k in keep} != {k: b.get(k) for k in keep}


def run_split(args: argparse.Namespace) -> int:
    replay = open_replay(args.directory)
    first, rest = args.into
    _check_apart([args.directory], [first, rest])
    if first.resolve() == rest.resolve():
        raise ReplayDirError(f"--into {first} {rest}: the two outputs must differ")
    if rest.exists():
        raise ReplayDirError(f"{rest}: already exists; the output must be a new directory (nothing is overwritten)")
    selection = selection_of(args)
    chosen = selection.apply(replay.episodes())
    if args.fraction is not None:
        if not 0.0 < args.fraction < 1.0:
            raise SelectionError(f"--fraction {args.fraction}: expected a number between 0 and 1")
        kept = []
        for stream in replay.streams:
            eps = [ep for ep in chosen if ep.stream == stream]
            kept += eps[: int(round(len(eps) * args.fraction))]
        chosen = kept
    ids = {id(ep) for ep in chosen}
    others = [ep for ep in replay.episodes() if id(ep) not in ids]
    length = _chunk_length(args)
    a = write_atomically(first, lambda w: [w.add(replay, ep) for ep in chosen], length, args.compress)
    try:
        b = write_atomically(rest, lambda w: [w.add(replay, ep) for ep in others], length, args.compress)
    except BaseException:
        shutil.rmtree(first, ignore_errors=True)  # both or neither
        raise
    _done(a, first)
    _done(b, rest)
    return 0
