"""`reverie-learner adapt`'s arguments, without importing torch (the command loads it): see adapt.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="zero-shot: train the reward head and task policy of an exploring run from its "
                       "recorded data, then evaluate (no collection)")
    p.add_argument("--from", dest="source", required=True, help="the exploring run's directory")
    p.add_argument("--logdir", required=True, help="where the adapted policy, metrics and summary go")
    p.add_argument("--updates", type=int, default=2000, help="updates of reward head and task actor-critic")
    p.add_argument("--reward", metavar="MODULE:FUNCTION", help="compute the reward from the recorded observations "
                   "(default: the reward recorded with each step)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (each with sampled and mode actions)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run's config")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from learner.agents.dreamer.adapt import adapt_run

    summary = adapt_run(Path(args.source), Path(args.logdir), args.updates, args.set, args.reward, args.episodes,
                        progress=not args.quiet)
    print(json.dumps(summary))
    return 0
