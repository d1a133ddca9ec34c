"""`reverie-replay record --config CFG --source scripted|keyboard|leader --episodes N --out DIR`: demonstrations
recorded into a replay directory, which `train`/`serve --prefill-from DIR` start learning with.

The steps are what `reverie-learner train` records for the same config (the same env adapter,
`learner/envs.py`: observations, model-form actions, flags), under their own stream (`demo-scripted`,
`demo-keyboard` unless `--stream`), described in streams.json. An existing replay directory of the same
step layout gets the new stream beside what it holds (chunk files are written atomically, one by one).

Controllers: `scripted` is the simulated task's own solver (`sim/tasks.py`; it sees the simulator's
state); `keyboard` reads keys from the terminal at the control rate: for action dimension i the keys
`qwerty`[i] push it to +1 and `asdfgh`[i] to -1 for one step (hold a key: the terminal repeats it),
digits pick a discrete action, `n` ends the episode (cut), `x` stops recording.

`leader` records a real (or emulated) servo robot copying a leader arm on a second bus (`--leader
LEADER_CONFIG`). Reading the leader and driving the follower is robot code (robot/teleop.py: the follower's
commands pass its safety layer), and the learner never imports the robot's code: so this starts
`reverie-robot run --leader ...` as a child process streaming to a link server of its own on loopback, which
stores the steps here (under `demo-leader`), exactly as `serve` would store a robot's, and stops the robot
(SIGINT: torque off) once `--episodes` episodes have arrived."""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, load_config
from core.interface import DiscreteSpec
from learner.offline.common import say

UP, DOWN = "qwerty", "asdfgh"
SOURCES = ("scripted", "keyboard", "leader")


class RecordError(Exception):
    """A recording that could not be made, with the reason."""

ROBOT_STOP_S = 60.0  # a robot asked to stop (SIGINT) walks its last chunk out and turns torque off within this


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record demonstrations (scripted controller, keyboard, leader arm) into a "
                                      "replay dir")
    p.add_argument("--config", required=True, help="a simulated task's config from hardware_configs/ (for --source "
                                                   "leader: the follower servo robot's)")
    p.add_argument("--source", "--controller", dest="source", choices=SOURCES, default="scripted",
                   help="what acts: the simulated task's scripted solver (default), the keyboard, or a leader arm")
    p.add_argument("--leader", metavar="CONFIG", help="--source leader: the leader arm's config "
                                                     "(e.g. hardware_configs/so101_leader.yaml)")
    p.add_argument("--leader-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the leader's config (e.g. motors.port=...)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to record (default 10)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the replay directory (created or added to)")
    p.add_argument("--stream", help="stream name (default demo-<controller>)")
    p.add_argument("--seed", type=int, help="first episode's seed (default: the config's seed + 2000000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=run)


def to_model(action: Any, spec: Any) -> np.ndarray:
    """An env-form action in model form: one-hot of a choice, or [low, high] mapped linearly onto [-1, 1]."""
    if isinstance(spec, DiscreteSpec):
        return np.eye(spec.n, dtype=np.float32)[int(action)]
    low = np.broadcast_to(np.asarray(spec.low, np.float64), spec.shape)
    high = np.broadcast_to(np.asarray(spec.high, np.float64), spec.shape)
    a = np.asarray(action, np.float64)
    return np.clip(2.0 * (a - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)


class Keyboard:
    """Keys pressed since the last tick, from a terminal (raw mode while recording) or any readable fd."""

    def __init__(self, spec: Any, fd: int) -> None:
        self.spec, self.fd = spec, fd
        self.quit = self.cut = False

    def keys(self) -> str:
        out = b""
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 64)
            if not chunk:
                self.quit = True  # end of input
                break
            out += chunk
        return out.decode(errors="ignore")

    def __call__(self, _obs: dict[str, np.ndarray]) -> Any:
        pressed = self.keys()
        self.quit |= "x" in pressed
        self.cut = "n" in pressed
        if isinstance(self.spec, DiscreteSpec):
            digits = [int(c) for c in pressed if c.isdigit() and int(c) < self.spec.n]
            return digits[-1] if digits else 0
        action = np.zeros(self.spec.shape, np.float32)
        for i in range(min(action.size, len(UP))):
            action.flat[i] = float(UP[i] in pressed) - float(DOWN[i] in pressed)
        low = np.broadcast_to(np.asarray(self.spec.low, np.float64), self.spec.shape)
        high = np.broadcast_to(np.asarray(self.spec.high, np.float64), self.spec.shape)
        return (low + (action + 1.0) * 0.5 * (high - low)).astype(np.float32)  # env form, as a controller gives


@contextmanager
def raw_terminal(fd: int):
    """Single keys without Enter while recording; the terminal's settings come back afterwards."""
    if not os.isatty(fd):
        yield
        return
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def record(args: argparse.Namespace) -> dict[str, Any]:
    from learner.envs import Env
    from learner.replay import Replay
    from sim.tasks import make_policy

    cfg = load_config(args.config, args.set)
    if args.episodes < 1:
        raise ConfigError([f"--episodes {args.episodes}: expected >= 1"], "arguments")
    if args.source == "leader":
        return record_leader(args, cfg)
    if args.leader:
        raise ConfigError(["--leader is for --source leader"], "arguments")
    if cfg.backend != "sim":
        raise ConfigError([f"--source {args.source} drives a simulated task; {cfg.name} is a {cfg.backend} robot "
                           "(a servo robot records with --source leader, or with reverie-robot run against "
                           "reverie-learner serve)"], "--config")
    env = Env(cfg, seed=cfg.seed + 2_000_000 if args.seed is None else args.seed)
    robot = env.env.unwrapped.robot
    keyboard = Keyboard(robot.action_spec, sys.stdin.fileno()) if args.source == "keyboard" else None
    controller: Callable[[dict], Any] = keyboard or make_policy("scripted", robot)
    stream = args.stream or f"demo-{args.source}"
    period = 1.0 / cfg.control.hz
    returns: list[float] = []
    steps = 0
    replay = Replay.from_config(args.out, cfg.replay, seed=cfg.seed)
    try:
        replay.describe(stream, {**env.describe(cfg), "source": f"{args.source} demonstrations, {env.id}"})
        with raw_terminal(sys.stdin.fileno()) if keyboard else _nothing():
            if keyboard:
                say(f"keyboard: keys {UP} push action dimensions 1.. up, {DOWN} down, digits pick a discrete "
                    "action; n ends the episode, x stops")
            while len(returns) < args.episodes and not (keyboard and keyboard.quit):
                obs, total, tick = env.reset(), 0.0, time.monotonic()
                while True:
                    action = to_model(controller(obs), robot.action_spec)
                    cut = keyboard is not None and (keyboard.cut or keyboard.quit)
                    replay.add({**obs, "action": action}, stream, task=env.id, policy_version=0)
                    total += float(obs["reward"])
                    steps += 1
                    if obs["is_last"]:
                        returns.append(total)
                        break
                    if cut:
                        replay.close_episode(stream)
                        break
                    obs = env.step(action)
                    if keyboard:
                        tick += period
                        time.sleep(max(0.0, tick - time.monotonic()))
    finally:
        replay.close()
        env.close()
    return {"directory": str(args.out), "stream": stream, "episodes": len(returns), "steps": steps,
            "returns": returns}


@contextmanager
def _nothing():
    yield


def record_leader(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """`--source leader`: the robot process teleoperated by the leader arm, its steps stored here (see the
    module docstring)."""
    from learner.link.server import LinkServer, LinkServerError
    from learner.replay import Replay

    if cfg.backend != "servo":
        raise ConfigError([f"--source leader: the follower must be a servo robot; {cfg.name} is a {cfg.backend} "
                           "robot"], "--config")
    if not args.leader:
        raise ConfigError(["--source leader needs --leader CONFIG (the leader arm's config, e.g. "
                           "hardware_configs/so101_leader.yaml)"], "arguments")
    load_config(args.leader, args.leader_set)  # a bad leader config is said here, before anything starts
    stream = args.stream or "demo-leader"
    replay = Replay.from_config(args.out, cfg.replay, seed=cfg.seed)
    work = Path(tempfile.mkdtemp(prefix=".record-leader-", dir=Path(args.out).resolve().parent))
    before = replay.stats()["streams"].get(stream, {"episodes": 0, "steps": 0})
    try:
        try:
            server = LinkServer(cfg.link, replay, work, address="tcp://127.0.0.1:*")
        except LinkServerError as exc:
            raise ConfigError([str(exc)], "link") from None
        server.start()
        try:
            code = _drive_robot(args, server, replay, stream, before["episodes"], work)
            server.check()
        finally:
            server.close()
        stats = replay.stats()["streams"].get(stream, {"episodes": 0, "steps": 0, "returns": []})
    finally:
        replay.close()
        shutil.rmtree(work, ignore_errors=True)
    if code not in (0, None):
        raise RecordError(f"--source leader: the robot process (reverie-robot run --leader) exited with status "
                          f"{code}: its message is above")
    returns = list(stats.get("returns", []))[before["episodes"]:]
    return {"directory": str(args.out), "stream": stream, "episodes": stats["episodes"] - before["episodes"],
            "steps": stats["steps"] - before["steps"], "returns": returns}


def _drive_robot(args: argparse.Namespace, server: Any, replay: Any, stream: str, before: int,
                 work: Path) -> int | None:
    """Run the teleoperated robot process until `args.episodes` new episodes of `stream` are stored (or it
    exits by itself); its exit status."""
    cmd = [sys.executable, "-m", "robot.cli", "run", "--config", str(args.config), "--learner", server.endpoint,
           "--robot-id", stream, "--spool", str(work / "spool"), "--leader", str(args.leader),
           *[w for s in args.set for w in ("--set", s)], *[w for s in args.leader_set for w in ("--leader-set", s)]]
    say(f"recording {args.episodes} episode(s) from the leader arm ({args.leader}) into {args.out}; Ctrl-C stops")
    proc = subprocess.Popen(cmd)  # the robot's own terminal: its e-stop key and operator prompts work
    try:
        while proc.poll() is None:
            stored = replay.stats()["streams"].get(stream, {}).get("episodes", 0)
            if stored - before >= args.episodes:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        say("interrupted: stopping the robot")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the robot stops safely: torque off, its last steps sent
            try:
                proc.wait(ROBOT_STOP_S)
            except subprocess.TimeoutExpired:
                say(f"the robot process did not stop within {ROBOT_STOP_S:.0f} s: killing it (cut servo power if "
                    "it holds torque)")
                proc.kill()
                proc.wait()
    return proc.returncode


def run(args: argparse.Namespace) -> int:
    try:
        summary = record(args)
    except (ConfigError, RecordError) as exc:
        say(str(exc))
        return 2
    mean = f", mean return {np.mean(summary['returns']):.3f}" if summary["returns"] else ""
    print(f"{summary['directory']}: stream {summary['stream']!r}: {summary['episodes']} episode(s), "
          f"{summary['steps']} steps{mean}")
    return 0
