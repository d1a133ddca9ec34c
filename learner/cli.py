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
from learner.agents.dreamer.adapt_cli import add_parser as add_adapt_parser
from learner.agents.dreamer.adapt_cli import run as run_adapt
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


def _rerun(target: str) -> str | None:
    """Check --rerun and hand it to the metrics writer of this process and of any rank it starts (through the
    environment: learner/viewers/rerun_live.py); why it cannot be used, else None."""
    from learner.formats import FormatError, require
    from learner.viewers.rerun_live import RERUN_ENV, target_problem

    try:
        require("rerun", "--rerun")
    except FormatError as exc:
        return str(exc)
    if problem := target_problem(target):
        return problem
    os.environ[RERUN_ENV] = target
    return None


def _train(args: argparse.Namespace) -> int:
    from learner.train import Trainer  # torch loads only when a command needs it

    if args.offline:  # no env: world model and behaviour on a recorded replay (learner/offline/train.py)
        from learner.offline.prefill import train_offline
        return train_offline(args) if not (problem := _logdir_problem(args.logdir)) else _fail(problem)
    cfg = _config(args)
    env_id(cfg, args.env)  # a config that names nothing `train` can step fails here, before the logdir is made
    if problem := _logdir_problem(args.logdir):
        return _fail(problem)
    if args.prefill_from and (problem := _prefill(args, cfg)):
        return _fail(problem)
    trainer = Trainer(cfg, args.logdir, env=args.env, progress=not args.quiet)
    summary = trainer.run()
    print(json.dumps(summary))
    if trainer.stopped:
        print(f"reverie-learner: stopped by {trainer.stopped} at {summary['env_steps']} env steps; checkpoint "
              f"{summary['checkpoint']}; run the same command to resume", file=sys.stderr)
    return 0


def _prefill(args: argparse.Namespace, cfg: Config) -> str | None:
    """--prefill-from DIR: recorded steps (demonstrations, earlier data) into a new run's replay before it
    learns (learner/offline/prefill.py); the problem, or None."""
    from learner.offline.prefill import ReplayDirError, prefill_serve, prefill_train

    try:
        done = (prefill_serve(cfg, Path(args.logdir), Path(args.prefill_from)) if args.command == "serve"
                else prefill_train(cfg, Path(args.logdir), Path(args.prefill_from), args.env))
    except ReplayDirError as exc:
        return f"--prefill-from: {exc}"
    print(f"reverie-learner: {done}", file=sys.stderr)
    return None


def _serve(args: argparse.Namespace) -> int:
    from core.link.security import LinkSecurityError
    from learner.distributed import launched
    from learner.link.server import LinkServerError
    from learner.serve import Server

    cfg = load_config(args.config, args.set)
    if problem := _deployments_problem(args, cfg):
        return _fail(problem)
    if args.bind and (expected := address_problem(args.bind, bind=True)):
        return _fail(f"--bind {args.bind!r}: expected {expected}")
    if problem := _logdir_problem(args.logdir):
        return _fail(problem)
    if args.prefill_from and (problem := _prefill(args, cfg)):
        return _fail(problem)
    if args.gpus is not None or launched():
        return _serve_ranks(args, cfg)
    try:
        if args.deployments:  # CASCADE's deployments over the link (learner/serve_deployments.py)
            from learner.serve_deployments import DeploymentServer
            server = DeploymentServer(cfg, args.logdir, bind=args.bind, progress=not args.quiet,
                                      robots=args.robots or 1)
        else:
            server = Server(cfg, args.logdir, bind=args.bind, progress=not args.quiet)
        summary = server.run(duration=args.duration)
    except (LinkSecurityError, LinkServerError) as exc:
        return _fail(str(exc))
    print(json.dumps(summary))
    out = server.logdir
    print(f"run directory {out}: learning curve {out / 'learning_curve.png'}, metrics {out / 'metrics.jsonl'}, "
          f"checkpoints {out / 'checkpoints'}, policy {out / 'policy.safetensors'}", file=sys.stderr)
    return 0


def _deployments_problem(args: argparse.Namespace, cfg: Config) -> str | None:
    """Why serve --deployments / --robots cannot run as asked, else None (before any work starts)."""
    from learner.distributed import launched

    if not args.deployments:
        return "--robots is for serve --deployments" if args.robots is not None else None
    from learner.serve_deployments import deployment_problem
    if (args.gpus or 1) > 1 or launched():
        return "serve --deployments runs on one rank: leave out --gpus N (N > 1) and torchrun"
    if args.robots is not None and args.robots < 1:
        return f"--robots {args.robots}: must be >= 1"
    return deployment_problem(cfg)


def _serve_ranks(args: argparse.Namespace, cfg: Config) -> int:
    """`serve` on several ranks (docs/scaling.md): --gpus N starts N local ranks (learner/launch.py); a rank
    started by torchrun or by that joins the job: rank 0 serves, the others train (learner/serve_ranks.py)."""
    from core.link.security import LinkSecurityError
    from learner.distributed import (
        DEFAULT_TIMEOUT_S,
        DistributedError,
        RankLost,
        close_world,
        init_world,
        launched,
        ranks_problem,
    )
    from learner.launch import launch, without_gpus
    from learner.link.server import LinkServerError
    from learner.serve_ranks import RankedServer, follow

    if args.gpus is not None:
        if launched():
            return _fail("--gpus starts the ranks itself; under torchrun leave it out")
        if problem := ranks_problem(cfg, args.gpus):
            return _fail(f"--gpus {args.gpus}: {problem}")
        return launch(without_gpus(args.argv), args.gpus) if args.gpus > 1 else _serve(
            argparse.Namespace(**{**vars(args), "gpus": None}))
    try:
        world = init_world(cfg.dreamer.device, args.rank_timeout or DEFAULT_TIMEOUT_S)
        if problem := ranks_problem(cfg, world.size, local=True):
            raise DistributedError(problem)
        if not world.is_main:
            follow(cfg, world)
            return 0
        server = RankedServer(cfg, args.logdir, world, bind=args.bind, progress=not args.quiet)
        summary = server.run(duration=args.duration)
    except (DistributedError, LinkSecurityError, LinkServerError) as exc:
        return _fail(str(exc))
    except RankLost as exc:
        print(f"reverie-learner: {exc}", file=sys.stderr)
        return 1
    finally:
        close_world()
    print(json.dumps(summary))
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
    train.add_argument("--offline", metavar="REPLAY_DIR", help="train on this recorded replay alone: no env, no robot "
                       "(docs/offline.md)")
    train.add_argument("--updates", type=int, metavar="N", help="with --offline: stop after N updates (default: "
                       "train.train_ratio replayed steps per recorded step)")
    train.add_argument("--prefill-from", metavar="REPLAY_DIR", help="a new run's replay starts with these steps "
                       "(demonstrations: reverie-replay record)")
    serve = sub.add_parser("serve", help="train on experience streamed by robot processes over the network")
    serve.add_argument("--config", required=True, help="a YAML file from hardware_configs/")
    serve.add_argument("--logdir", required=True, help="run directory (resumed when it exists)")
    serve.add_argument("--bind", help="address to listen on (default: link.bind), e.g. tcp://0.0.0.0:5555")
    serve.add_argument("--duration", type=flags.seconds, help="stop after this many seconds")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    serve.add_argument("--quiet", action="store_true", help="no progress bar")
    serve.add_argument("--prefill-from", metavar="REPLAY_DIR", help="a new run's replay starts with these steps "
                       "(demonstrations, earlier robot data); robots must send the same step layout")
    serve.add_argument("--gpus", type=int, metavar="N", help="train on N local GPUs, one rank each "
                       "(docs/scaling.md; with dreamer.device=cpu, N CPU processes)")
    serve.add_argument("--deployments", action="store_true", help="CASCADE's deployments (docs/lineage.md): "
                       "each robot acts a frozen explorer per deployment, the learner trains only between them "
                       "(explore.deployments, explore.deployment_steps, explore.deployment_updates)")
    serve.add_argument("--robots", type=int, metavar="N", help="with --deployments: each deployment starts once N "
                       "robots are connected (default 1)")
    serve.add_argument("--rank-timeout", type=flags.seconds, metavar="SECONDS",
                       help="with several ranks: how long a rank waits for a silent one before the job stops "
                       "(default 300)")
    for p in (train, serve):
        p.add_argument("--rerun", nargs="?", const="save", metavar="TARGET", help="log scalars, evaluation and "
                       "open-loop videos live to rerun: LOGDIR/rerun.rrd (default), FILE.rrd, spawn, or a viewer URL")
    add_gato_parser(sub)
    add_adapt_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "rerun", None) is not None and (problem := _rerun(args.rerun)):
        return _fail(problem)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus N starts each rank with
    if args.command == "gato":
        return run_gato(args)
    try:
        if args.command == "adapt":
            return run_adapt(args)
        return _serve(args) if args.command == "serve" else _train(args)
    except (ConfigError, EnvError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C while starting up, before the run's own handlers are in place
        print("reverie-learner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
