"""`reverie-learner gato`: record expert episodes, train one Gato model on them, evaluate it per task.

    reverie-learner gato data --task all --episodes 200 --out data/gato
    reverie-learner gato train --data data/gato --logdir runs/gato --set updates=20000
    reverie-learner gato eval --data data/gato --logdir runs/gato --episodes 10

`data` writes one task directory per task (replay/, the resolved config, task.json); `train` reads every
task directory it is given (or each one inside a given folder) and writes one policy blob per task into
RUN/policies/, which `reverie-robot run --set link.initial_weights=...` acts with; `eval` prints each
task's return beside its expert's as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from core.config import ConfigError, apply_overrides, load_config, parse_overrides
from core.config.base import describe_errors
from core.config.gato import GatoConfig
from learner.gato.experts import SUITE, TASK_FILE


def add_parser(sub: argparse._SubParsersAction) -> None:
    gato = sub.add_parser("gato", help="Gato: record expert episodes, train one model on many tasks, evaluate it")
    cmds = gato.add_subparsers(dest="gato_command", required=True)
    data = cmds.add_parser("data", help="record scripted-expert episodes into task directories")
    data.add_argument("--task", action="append", default=[], metavar="NAME",
                      help=f"a suite task ({', '.join(SUITE)}) or 'all'; repeatable")
    data.add_argument("--config", help="record this config's task instead (it needs a scripted expert)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    data.add_argument("--out", required=True, help="folder that receives one task directory per task")
    data.add_argument("--episodes", type=int, default=100, help="expert episodes per task")
    data.add_argument("--random-episodes", type=int, default=10, help="random-policy episodes (the score's 0)")
    for name, text in (("train", "train one model on task directories"), ("eval", "evaluate a run per task")):
        cmd = cmds.add_parser(name, help=text)
        cmd.add_argument("--data", nargs="+", required=True, help="task directories, or folders holding them")
        cmd.add_argument("--logdir", required=True, help="run directory (resumed when it exists)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a gato setting (e.g. layers=2; 'gato.' may prefix it)")
        cmd.add_argument("--quiet", action="store_true", help="no progress lines")
    cmds.choices["eval"].add_argument("--episodes", type=int, help="episodes per task (default gato.eval_episodes)")
    cmds.choices["eval"].add_argument("--act", choices=("mode", "sample"), default="mode",
                                      help="the most likely action tokens, or sampled ones")


def gato_config(overrides: list[str], base: GatoConfig | None = None) -> GatoConfig:
    """The gato settings: `base` (a resumed run's) or the defaults, with `--set` applied (ConfigError)."""
    parsed = {k.removeprefix("gato."): v for k, v in parse_overrides(overrides).items()}
    raw = (base or GatoConfig()).model_dump(mode="json")
    apply_overrides(raw, parsed)
    try:
        return GatoConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, GatoConfig), "--set (gato)") from None


def task_dirs(paths: list[str]) -> list[Path]:
    """Task directories named, or found one level inside a named folder (ValueError when none)."""
    out: list[Path] = []
    for given in map(Path, paths):
        if (given / TASK_FILE).is_file():
            out.append(given)
        elif given.is_dir() and (found := sorted(p.parent for p in given.glob(f"*/{TASK_FILE}"))):
            out.extend(found)
        else:
            raise ValueError(f"--data {given}: neither a task directory nor a folder of them (no {TASK_FILE}); "
                             "record one with `reverie-learner gato data`")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        return {"data": _data, "train": _train, "eval": _eval}[args.gato_command](args)
    except (ConfigError, ValueError) as exc:
        print(f"reverie-learner gato {args.gato_command}: {exc}", file=sys.stderr)
        return 2


def _data(args: argparse.Namespace) -> int:
    from learner.gato.experts import record

    if args.episodes < 1:
        raise ValueError(f"--episodes {args.episodes}: record at least one")
    names = list(SUITE) if "all" in args.task else args.task
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"--task {unknown[0]!r}: not a suite task ({', '.join(SUITE)}, or all)")
    if bool(names) == bool(args.config):
        raise ValueError("give --task NAME (suite tasks) or --config FILE, one of the two")
    jobs = [(n, SUITE[n].load(args.set)) for n in names] if names else []
    if args.config:
        cfg = load_config(args.config, args.set)
        jobs = [(cfg.name, cfg)]
    quiet = lambda text: print(text, file=sys.stderr)  # noqa: E731
    report = {name: record(cfg, Path(args.out) / name, args.episodes, args.random_episodes, quiet)
              for name, cfg in jobs}
    print(json.dumps({n: {k: r[k] for k in ("expert_return", "expert_success", "random_return")}
                      for n, r in report.items()}))
    return 0


def _open_run(args: argparse.Namespace):  # noqa: ANN202 - GatoRun, imported with torch
    from learner.gato.episodes import TaskData
    from learner.gato.train import GatoRun, read_run_config

    cfg = gato_config(args.set, read_run_config(args.logdir))
    tasks = [TaskData.load(d, cfg) for d in task_dirs(args.data)]
    return GatoRun(cfg, tasks, args.logdir, progress=not args.quiet)


def _train(args: argparse.Namespace) -> int:
    gato = _open_run(args)
    summary = gato.run()
    print(json.dumps(summary))
    if gato.stopped:
        print(f"reverie-learner gato: stopped by {gato.stopped} at update {gato.updates}; run the same command to "
              "resume", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    gato = _open_run(args)
    if gato.updates == 0:
        raise ValueError(f"{args.logdir}: no checkpoint to evaluate; train first")
    print(json.dumps({"updates": gato.updates, "tasks": gato.evaluate(args.episodes, args.act)}))
    return 0
