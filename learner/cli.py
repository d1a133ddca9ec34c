"""`reverie-learner`: the learner's command line.

    reverie-learner train --config hardware_configs/sim_arm_reach.yaml --logdir runs/reach
    reverie-learner train --env gymnasium:Pendulum-v1 --logdir runs/pendulum --set train.steps=20000
    reverie-learner serve --config hardware_configs/sim_arm_reach.yaml --logdir runs/reach --bind tcp://0.0.0.0:5555

`train` steps an environment itself; `serve` trains on experience that robot processes
(`reverie-robot run`) stream to it. Running the same command again resumes the run in --logdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.config import Config, ConfigError, apply_overrides, config_from_dict, flags, load_config, parse_overrides
from core.config.link import address_problem
from learner.compute import prepare_openmp
from learner.envs import GYM_PREFIX, EnvError, env_id
from learner.gato.cli import add_parser as add_gato_parser
from learner.gato.cli import run as run_gato


def _config(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config, args.set)
    if not args.env:
        raise ConfigError(["give --config FILE, or --env gymnasium:ID to train on a Gymnasium env"], "arguments")
    gym_id = args.env.removeprefix(GYM_PREFIX)
    raw: dict = {"name": gym_id.replace("/", "_"), "backend": "gym", "gym_id": gym_id}
    overrides = parse_overrides(args.set)
    apply_overrides(raw, overrides)
    return config_from_dict(raw, f"--env {args.env}", overrides)


def _fail(message: str) -> int:
    print(f"reverie-learner: {message}", file=sys.stderr)
    return 2


def _logdir_problem(logdir: str) -> str | None:
    """Why --logdir cannot hold a run (created here if missing), else None: found before any work starts."""
    path = Path(logdir)
    if path.exists() and not path.is_dir():
        return f"--logdir {logdir}: exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--logdir {logdir}: cannot create it ({exc.strerror or exc})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"--logdir {logdir}: not writable"
    return None


def _train(args: argparse.Namespace) -> int:
    from learner.train import Trainer  # torch loads only when a command needs it

    cfg = _config(args)
    env_id(cfg, args.env)  # a config that names nothing `train` can step fails here, before the logdir is made
    if problem := _logdir_problem(args.logdir):
        return _fail(problem)
    trainer = Trainer(cfg, args.logdir, env=args.env, progress=not args.quiet)
    summary = trainer.run()
    print(json.dumps(summary))
    if trainer.stopped:
        print(f"reverie-learner: stopped by {trainer.stopped} at {summary['env_steps']} env steps; checkpoint "
              f"{summary['checkpoint']}; run the same command to resume", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from core.link.security import LinkSecurityError
    from learner.link.server import LinkServerError
    from learner.serve import Server

    cfg = load_config(args.config, args.set)
    if args.bind and (expected := address_problem(args.bind, bind=True)):
        return _fail(f"--bind {args.bind!r}: expected {expected}")
    if problem := _logdir_problem(args.logdir):
        return _fail(problem)
    try:
        server = Server(cfg, args.logdir, bind=args.bind, progress=not args.quiet)
        summary = server.run(duration=args.duration)
    except (LinkSecurityError, LinkServerError) as exc:
        return _fail(str(exc))
    print(json.dumps(summary))
    out = server.logdir
    print(f"run directory {out}: learning curve {out / 'learning_curve.png'}, metrics {out / 'metrics.jsonl'}, "
          f"checkpoints {out / 'checkpoints'}, policy {out / 'policy.safetensors'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    prepare_openmp()  # before torch loads: idle OpenMP threads must sleep, not spin (learner/compute.py)
    parser = argparse.ArgumentParser(prog="reverie-learner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train Dreamer on a simulated task or a Gymnasium env")
    train.add_argument("--config", help="a YAML file from hardware_configs/")
    train.add_argument("--env", help="gymnasium:ID to train on a registered Gymnasium env instead")
    train.add_argument("--logdir", required=True, help="run directory (resumed when it exists)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    serve = sub.add_parser("serve", help="train on experience streamed by robot processes over the network")
    serve.add_argument("--config", required=True, help="a YAML file from hardware_configs/")
    serve.add_argument("--logdir", required=True, help="run directory (resumed when it exists)")
    serve.add_argument("--bind", help="address to listen on (default: link.bind), e.g. tcp://0.0.0.0:5555")
    serve.add_argument("--duration", type=flags.seconds, help="stop after this many seconds")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    serve.add_argument("--quiet", action="store_true", help="no progress bar")
    add_gato_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "gato":
        return run_gato(args)
    try:
        return _serve(args) if args.command == "serve" else _train(args)
    except (ConfigError, EnvError) as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
