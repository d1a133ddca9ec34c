"""`reverie-replay episodes DIR`: a table of the episodes of each stream (length, return, success where
the task defines it, start and end time, acting policy versions, how it ended), filterable, `--json`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from learner.offline.common import add_dir, open_replay, when
from learner.offline.reader import Episode, ReplayDir
from learner.offline.select import add_selection, selection_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("episodes", help="a table of episodes per stream (length, return, success, time, versions)")
    add_dir(p)
    add_selection(p)
    p.add_argument("--json", action="store_true", help="print JSON: one object per episode, and totals")
    p.set_defaults(func=run)


def report(replay: ReplayDir, episodes: list[Episode]) -> dict[str, Any]:
    streams: dict[str, dict[str, Any]] = {}
    for ep in episodes:
        s = streams.setdefault(ep.stream, {"episodes": 0, "complete": 0, "steps": 0, "successes": 0, "judged": 0})
        s["episodes"] += 1
        s["complete"] += ep.complete
        s["steps"] += ep.length
        if ep.success is not None:
            s["judged"] += 1
            s["successes"] += ep.success
    return {"directory": str(replay.directory), "episodes": [ep.row() for ep in episodes], "streams": streams,
            "skipped": replay.problems}


def _success(ep: Episode) -> str:
    return "-" if ep.success is None else ("yes" if ep.success else "no")


def render(replay: ReplayDir, episodes: list[Episode]) -> str:
    header = f"{'stream':<12} {'ep':>4} {'task':<14} {'steps':>6} {'return':>10} {'success':>7} " \
             f"{'start (UTC)':<19}  {'end (UTC)':<19}  {'versions':>9}  end"
    lines = [f"replay {replay.directory}: {len(episodes)} episode(s)", header]
    for ep in episodes:
        versions = f"{ep.versions[0]}" if ep.versions[0] == ep.versions[1] else f"{ep.versions[0]}-{ep.versions[1]}"
        end = ep.end if ep.started else f"{ep.end} (started before the data)"
        lines.append(f"{ep.stream[:12]:<12} {ep.index:>4} {ep.task[:14]:<14} {ep.length:>6} {ep.ret:>10.3f} "
                     f"{_success(ep):>7} {when(ep.start_time):<19}  {when(ep.end_time):<19}  {versions:>9}  {end}")
    for stream, s in report(replay, episodes)["streams"].items():
        rate = f", success {s['successes']}/{s['judged']}" if s["judged"] else ""
        lines.append(f"stream {stream!r}: {s['episodes']} episode(s), {s['complete']} complete, {s['steps']} steps"
                     f"{rate}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    replay = open_replay(args.directory)
    episodes = selection_of(args).apply(replay.episodes())
    print(json.dumps(report(replay, episodes), indent=1) if args.json else render(replay, episodes))
    return 0
