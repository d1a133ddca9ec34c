"""`reverie-robot`: the on-robot process.

    reverie-robot run --config hardware_configs/sim_arm_reach.yaml --learner tcp://HOST:5555

Drives the config's robot backend at `control.hz` with the local policy, streams experience to the
learner and acts with the newest weights it sends. Ctrl-C (or --duration / --steps) stops the robot
safely; experience not yet acknowledged stays in the spool and is sent on the next run.

Exit status: 0 stopped by a limit or Ctrl-C; 2 a config, flag or start-up error (nothing moved);
3 the spool is full; 4 a safety stop; 5 the learner refused this robot, or the link failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from core.config import ConfigError, flags, load_config
from core.config.link import (
    address_problem,
    chunk_steps,
    default_spool_dir,
    message_room_problem,
    robot_id_problem,
)
from core.describe import describe_specs, success_rule
from core.layout import StepLayout
from core.link.security import LinkSecurityError
from robot.tools import devices, servos


def _run(args: argparse.Namespace) -> int:
    import torch

    from core.interface import RobotError
    from core.weights import CheckpointError
    from robot.backends import BackendError, make_backend
    from robot.link.contract import LinkError
    from robot.link.factory import make_link
    from robot.runner import ControlLoop, load_initial, step_spec

    torch.set_num_threads(1)  # the policy shares the robot's CPU with the control loop: keep it predictable
    cfg = load_config(args.config, args.set)
    link_cfg = cfg.link
    robot_id = args.robot_id or link_cfg.robot_id or cfg.name
    if not (args.robot_id or link_cfg.robot_id) and (expected := robot_id_problem(robot_id)):  # a name is any text
        print(f"reverie-robot: robot id {robot_id!r} (the config's name; set link.robot_id or --robot-id): "
              f"expected {expected}", file=sys.stderr)
        return 2
    address = args.learner or link_cfg.learner
    if args.learner and (expected := address_problem(args.learner, bind=False)):
        print(f"reverie-robot: --learner {args.learner!r}: expected {expected}", file=sys.stderr)
        return 2
    spool_dir = Path(args.spool or link_cfg.spool_dir or default_spool(robot_id))
    try:  # before the robot opens: a bad weights file must not get as far as the motors
        initial = load_initial(link_cfg.initial_weights)
    except CheckpointError as exc:
        print(f"reverie-robot: link.initial_weights: {exc}", file=sys.stderr)
        return 2
    try:
        robot = make_backend(cfg)
    except (BackendError, RobotError) as exc:  # e.g. a servo missing or in alarm at start: torque is off
        print(f"reverie-robot: {exc}", file=sys.stderr)
        return 2
    with robot, contextlib.ExitStack() as teleop:
        controller, source = None, f"robot {cfg.name}"
        if args.leader:
            try:
                controller, source = _leader(args, cfg, robot, teleop)
            except (ConfigError, RobotError) as exc:  # the follower closes (torque off) on the way out of `with`
                print(f"reverie-robot: {exc}", file=sys.stderr)
                return 2
        spec, act = step_spec(robot)
        task = cfg.task or cfg.name
        hello = {"spec": spec.to_wire(), "task": task, "hz": float(cfg.control.hz), "discrete": act.discrete,
                 # what the arrays mean (names, units, bounds), kept by the learner's replay: core/describe.py
                 "describe": describe_specs(robot.observation_spec, robot.action_spec, hz=cfg.control.hz, task=task,
                                            success=success_rule(cfg.task, cfg), source=source)}
        if problem := _message_problem(cfg, spec, robot_id, hello):  # before the link starts and anything moves
            print(f"reverie-robot: link.max_message_mb: expected {problem}, found {link_cfg.max_message_mb}",
                  file=sys.stderr)
            return 2
        link = make_link(link_cfg, address, robot_id, spool_dir, hello)
        try:
            loop = ControlLoop(cfg, robot, link, seed=cfg.seed, initial=initial, ledger=args.ledger,
                               controller=controller)
        except ValueError as exc:  # initial weights of another task: nothing has moved yet
            if initial is None:
                raise
            print(f"reverie-robot: link.initial_weights {link_cfg.initial_weights}: {exc}", file=sys.stderr)
            return 2
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: loop.stop("interrupted"))
        try:
            link.start()
        except LinkError as exc:  # the robot closes (torque off) on the way out of `with`
            print(f"reverie-robot: {exc}", file=sys.stderr)
            return 2
        try:
            stats = loop.run(duration=args.duration, max_steps=args.steps)
            link.wait_acked(2 * link_cfg.lost_after_s)
        finally:
            link.close()
    status = link.status()
    summary = {"robot": robot_id, "stopped": loop.stop_reason, "steps": stats.steps, "episodes": stats.episodes,
               "weights_swaps": stats.swaps, "acting_version": loop.version,
               "period_error_p50": round(stats.period_error(0.5), 4),
               "period_error_p99": round(stats.period_error(0.99), 4),
               "spool_pending": status.spool_count, "weights_rejected": status.weights_rejected}
    print(json.dumps(summary))
    return _exit_code(loop.stop_reason, status.refused)


def _leader(args: argparse.Namespace, cfg: Any, robot: Any, stack: contextlib.ExitStack) -> tuple[Any, str]:
    """The leader arm of `--leader` opened (closed by `stack`) and the follower's controller reading it."""
    from core.interface import RobotError
    from robot.servo.robot import ServoRobot
    from robot.teleop import LeaderArm, LeaderControl

    if not isinstance(robot, ServoRobot):
        raise RobotError(f"--leader: the follower must be a servo robot; {cfg.name} is a {cfg.backend} robot")
    leader_cfg = load_config(args.leader, args.leader_set)
    leader = stack.enter_context(LeaderArm(leader_cfg, robot.names))
    return LeaderControl(leader, robot), f"leader arm demonstrations ({leader_cfg.name} leading {cfg.name})"


def _exit_code(stopped: str, refused: str) -> int:
    """4: a safety stop; 3: the spool filled up; 5: the learner refused this robot or the link failed
    (what it recorded is in the spool); 0: a limit or Ctrl-C. The reason goes to stderr."""
    if stopped.startswith("robot stopped"):
        print(f"reverie-robot: {stopped}", file=sys.stderr)
        return 4
    if stopped.startswith("spool full"):
        return 3
    if refused and not stopped.startswith("refused by the learner"):  # a run shorter than one chunk
        stopped = f"refused by the learner: {refused}"
    if stopped.startswith(("refused by the learner", "link failed")):
        print(f"reverie-robot: {stopped}", file=sys.stderr)
        return 5
    return 0


def _message_problem(cfg: Any, spec: StepLayout, robot_id: str, hello: dict) -> str | None:
    """Why link.max_message_mb cannot carry this robot's largest message, else None: one chunk of its step
    layout, or its hello (which carries the layout and the description of every array, and can be the larger
    one for a robot with many named joints and no camera)."""
    from robot.link.base import chunk_message_bytes, hello_message_bytes

    steps = chunk_steps(cfg.link.chunk_seconds, cfg.control.hz)
    chunk = chunk_message_bytes(spec, steps, robot_id)
    greeting = hello_message_bytes(hello, robot_id)
    return message_room_problem(cfg.link.max_message_mb, max(chunk, greeting),
                                f"one chunk of this robot: {steps} steps, {chunk} bytes; its hello: {greeting} bytes")


def default_spool(robot_id: str) -> Path:
    """The spool when neither --spool nor link.spool_dir names one (see `default_spool_dir`); a spool an
    earlier version left at its old default, spool/<robot id> in the working directory, is kept in use:
    it may hold unsent chunks, and its chunk counter must go on (a fresh spool would restart at 0)."""
    old = Path("spool") / robot_id
    if old.is_dir():
        print(f"reverie-robot: using the spool {old} in the working directory (the default before "
              f"{default_spool_dir(robot_id)}); move it there, or keep it with --spool {old}", file=sys.stderr)
        return old
    return default_spool_dir(robot_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reverie-robot", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="drive a robot and learn with a learner")
    run.add_argument("--config", required=True, help="a YAML file from hardware_configs/")
    run.add_argument("--learner", help="learner address (default: link.learner), e.g. tcp://10.0.0.2:5555")
    run.add_argument("--robot-id", type=flags.robot_id,
                     help="id on the link (default: link.robot_id, else the config name)")
    run.add_argument("--spool", help="spool directory (default: link.spool_dir, else "
                     "$XDG_STATE_HOME/reverie/spool/<robot id>, ~/.local/state/reverie/spool/<robot id> without it)")
    run.add_argument("--duration", type=flags.seconds, help="stop after this many seconds")
    run.add_argument("--steps", type=flags.count, help="stop after this many control steps")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--leader", metavar="CONFIG", help="teleoperate: the follower (this servo robot) copies the "
                     "leader arm of this config (its own bus, torque off), e.g. hardware_configs/so101_leader.yaml")
    run.add_argument("--leader-set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the leader's config (e.g. motors.port=...)")
    run.add_argument("--verbose", action="store_true", help="log link events")
    run.add_argument("--ledger", type=Path, help="append a line per sent chunk: step times and content hashes "
                     "(to check later that the learner stored every step exactly once)")
    servos.add_commands(sub)
    devices.add_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "device_command"):
        return devices.run_command(args)
    if args.command != "run":
        return servos.run_command(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("reverie.robot.status").setLevel(logging.INFO)  # progress is shown without -v
    try:
        return _run(args)
    except (ConfigError, LinkSecurityError, OSError) as exc:
        print(f"reverie-robot: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
