"""`reverie-replay info DIR`: streams, steps, completed episodes and returns, time span and policy versions of a
replay directory, from its chunk files alone (read-only: it never writes, not even the index)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from learner.offline.common import PROG, add_dir, fail
from learner.replay.chunk_file import ChunkError, is_chunk_name, read_chunk, verify_crc
from learner.replay.index import INDEX_NAME
from learner.replay.streams import EpisodeTracker

LAST_RETURNS = 5


def summarize(directory: Path) -> dict[str, Any]:
    """Per stream and in total: steps, chunks, completed episodes and returns, time span, policy versions.
    Unreadable or corrupt chunk files (every member's CRC-32 is checked, as a learner loading the file
    would) are not counted: they are listed under `skipped`, with the reason under `problems`, and
    reported on stderr."""
    paths = sorted(p for p in directory.iterdir() if is_chunk_name(p.name))
    streams: dict[str, dict[str, Any]] = {}
    trackers: dict[str, EpisodeTracker] = {}
    last_uuid: dict[str, str] = {}
    problems: dict[str, str] = {}
    total_bytes = 0
    for path in paths:  # names sort by creation order
        try:
            verify_crc(path)
            meta, steps, times, versions = read_chunk(path, keys=("reward", "is_first", "is_last"))
        except ChunkError as exc:
            print(f"{PROG}: warning: skipping chunk file {path}: {exc}", file=sys.stderr)
            problems[path.name] = str(exc).removeprefix(f"{path.name}: ")
            continue
        total_bytes += path.stat().st_size
        s = streams.setdefault(
            meta.stream, {"tasks": [], "steps": 0, "chunks": 0, "times": [], "versions": set(), "gaps": 0}
        )
        tracker = trackers.setdefault(meta.stream, EpisodeTracker())
        if meta.stream in last_uuid and meta.prev != last_uuid[meta.stream]:
            tracker.reset()
            s["gaps"] += 1
        last_uuid[meta.stream] = meta.uuid
        tracker.extend(steps["reward"], steps["is_first"], steps["is_last"], meta.abandoned)
        if meta.task not in s["tasks"]:
            s["tasks"].append(meta.task)
        s["steps"] += meta.length
        s["chunks"] += 1
        if meta.length:
            s["times"] += [float(times.min()), float(times.max())]
        s["versions"].update(np.unique(versions).tolist())
    out = {name: _stream_report(s, trackers[name]) for name, s in streams.items()}
    totals = {
        "streams": len(out),
        "steps": sum(s["steps"] for s in out.values()),
        "chunks": sum(s["chunks"] for s in out.values()),
        "episodes": sum(s["episodes"] for s in out.values()),
        "bytes": total_bytes,
    }
    return {"directory": str(directory), "streams": out, "totals": totals, "skipped": list(problems),
            "problems": problems}


def _stream_report(s: dict[str, Any], tracker: EpisodeTracker) -> dict[str, Any]:
    returns = tracker.returns
    first, last = (min(s["times"]), max(s["times"])) if s["times"] else (None, None)
    return {
        "task": s["tasks"][-1] if s["tasks"] else "",
        "tasks": s["tasks"],
        "steps": s["steps"],
        "chunks": s["chunks"],
        "gaps": s["gaps"],  # places where a chunk does not continue the previous one (deleted or unreadable)
        "episodes": len(returns),
        "abandoned": tracker.abandoned,  # episodes cut because their robot vanished (not counted above)
        "returns": {
            "mean": float(np.mean(returns)) if returns else None,
            "min": min(returns) if returns else None,
            "max": max(returns) if returns else None,
            "last": returns[-LAST_RETURNS:],
        },
        "time": {"first": first, "last": last, "span_s": (last - first) if first is not None else None},
        "policy_versions": sorted(s["versions"]),
    }


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _versions(versions: list[int]) -> str:
    if len(versions) <= 6:
        return ", ".join(map(str, versions)) or "-"
    return f"{versions[0]}..{versions[-1]} ({len(versions)} distinct)"


def render(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [
        f"replay {report['directory']}: {t['streams']} stream(s), {t['steps']} steps in {t['chunks']} chunk file(s) "
        f"({t['bytes'] / 1e6:.1f} MB), {t['episodes']} completed episode(s)"
    ]
    for name, s in report["streams"].items():
        r, tm = s["returns"], s["time"]
        tasks = ", ".join(repr(x) for x in s["tasks"])
        lines.append(f"  stream {name!r}: task {tasks}")
        line = f"    {s['steps']} steps in {s['chunks']} chunk(s), {s['episodes']} episode(s)"
        if s["episodes"]:
            last = ", ".join(f"{x:.3g}" for x in r["last"])
            line += f"; return mean {r['mean']:.3g} min {r['min']:.3g} max {r['max']:.3g}; last {last}"
        lines.append(line)
        span = f" ({tm['span_s']:.1f} s)" if tm["span_s"] is not None else ""
        versions = _versions(s["policy_versions"])
        lines.append(f"    time {_when(tm['first'])} .. {_when(tm['last'])}{span}; policy versions {versions}")
        if s["abandoned"]:
            lines.append(f"    {s['abandoned']} episode(s) abandoned (the robot vanished mid-episode)")
        if s["gaps"]:
            lines.append(f"    {s['gaps']} gap(s) between chunks (deleted or unreadable files)")
    if report["skipped"]:
        named = ", ".join(f"{name} ({why})" for name, why in report["problems"].items())
        lines.append(f"skipped {len(report['skipped'])} unreadable or corrupt chunk file(s), not counted: {named}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if not directory.exists():
        return fail(f"{directory}: no such directory")
    if not directory.is_dir():
        return fail(f"{directory}: not a directory")
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError as exc:
        return fail(f"{directory}: cannot list it ({exc.strerror})")
    if INDEX_NAME not in names and not any(is_chunk_name(n) for n in names):
        # A run's logdir keeps its store in replay/: name it rather than leave the user guessing.
        hint = f"; its replay store is {directory / 'replay'}" if (directory / "replay").is_dir() else ""
        return fail(f"{directory}: not a replay directory (no {INDEX_NAME} and no chunk files){hint}")
    report = summarize(directory)
    if not report["totals"]["chunks"]:  # nothing readable: say so as the other verbs do, not "0 streams"
        unreadable = "; ".join(f"{name} ({why})" for name, why in report["problems"].items())
        return fail(f"{directory}: the replay is empty (no readable chunk files{'; unreadable: ' if unreadable else ''}"
                    f"{unreadable})")
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="streams, steps, episodes and returns of a replay directory")
    add_dir(p)
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    p.set_defaults(func=run)
