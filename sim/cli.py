"""`reverie-sim`: look at the simulated robots without a display.

    reverie-sim view --config hardware_configs/sim_quadruped_walk.yaml --policy random --steps 200 --out run.mp4
    reverie-sim specs --config hardware_configs/sim_arm_reach.yaml
    reverie-sim emulate --config hardware_configs/so101_arm.yaml --write-calibration calibration/so101_arm.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from core.config import Config, ConfigError, flags, load_config, write_resolved
from core.interface import ArraySpec, DiscreteSpec
from core.video import FORMATS, VideoWriter, side_by_side
from sim.tasks import TASKS, make_policy, make_robot

if TYPE_CHECKING:  # the emulator's modules load only for `emulate`
    from robot.emulated.servo_bus import ServoEmulator
    from robot.servo.calibration import Calibration


@dataclass
class EpisodeStats:
    returns: list[float] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)
    partial: tuple[int, float] | None = None  # (steps, return) of an episode the run stopped inside

    def summary(self, episode_steps: int) -> dict[str, object]:
        out: dict[str, object] = {
            "episodes": len(self.returns),
            "mean_return": float(np.mean(self.returns)) if self.returns else None,  # complete episodes only
            "returns": [round(r, 3) for r in self.returns],
        }
        if self.successes:
            out["success_rate"] = float(np.mean(self.successes))
        if self.partial:
            steps, ret = self.partial
            out["partial_episode"] = {"steps": steps, "of": episode_steps, "return": round(ret, 3)}
        return out


def view(cfg: Config, policy_name: str, out: Path, size: int, seed: int, steps: int | None = None,
         episodes: int | None = None, act: str = "mode", warn: Callable[[str], None] | None = None,
         ) -> dict[str, object]:
    """Run the policy for `steps` steps, or until `episodes` episodes have ended, resetting at episode ends;
    one video frame per step. `act`: how a trained policy picks its actions (mode or sample)."""
    if (steps is None) == (episodes is None):
        raise ValueError("view: give steps or episodes")
    write_resolved(cfg, out.parent, name=f"{out.name}.config.yaml")
    stats = EpisodeStats()
    total, unit = (steps, "step") if steps is not None else (episodes, "episode")
    with make_robot(cfg) as robot, VideoWriter(out, fps=cfg.control.hz) as video, \
            tqdm(total=total, desc=f"{cfg.name} {policy_name}", unit=unit, file=sys.stderr) as bar:
        policy = make_policy(policy_name, robot, seed=seed, mode=act, warn=warn)
        obs = robot.reset(seed=cfg.seed)
        ret, length, taken = 0.0, 0, 0
        while (steps is None or taken < steps) and (episodes is None or len(stats.returns) < episodes):
            robot.send(policy(obs))
            obs = robot.observe()
            ret, length, taken = ret + float(obs["reward"]), length + 1, taken + 1
            video.append(side_by_side(robot.render_frame(size, size), obs.get("image")))
            bar.update(steps is not None)
            if obs["is_last"]:
                stats.returns.append(ret)
                if "success" in robot.info:
                    stats.successes.append(bool(robot.info["success"]))
                bar.update(episodes is not None)
                obs, ret, length = robot.reset(), 0.0, 0
        stats.partial = (length, ret) if length else None
        frames = video.frames
    return {"video": str(out), "frames": frames, **stats.summary(cfg.control.episode_steps)}


def free_name(path: Path) -> Path:
    """`path`, or the first of name-2.ext, name-3.ext, ... that does not exist yet."""
    candidate, n = path, 2
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def _spec_row(name: str, spec: ArraySpec | DiscreteSpec) -> dict[str, object]:
    if isinstance(spec, DiscreteSpec):
        return {"name": name, "kind": "discrete", "n": spec.n, "choices": list(spec.names)}
    low = np.asarray(spec.low)
    high = np.asarray(spec.high)
    return {
        "name": name,
        "shape": list(spec.shape),
        "dtype": str(spec.dtype),
        "unit": spec.unit,
        "low": low.tolist() if np.all(np.isfinite(low)) else None,
        "high": high.tolist() if np.all(np.isfinite(high)) else None,
        "names": list(spec.names),
    }


def specs(cfg: Config) -> dict[str, object]:
    with make_robot(cfg) as robot:
        return {
            "task": cfg.task,
            "observation": [_spec_row(k, s) for k, s in robot.observation_spec.items()],
            "action": _spec_row("action", robot.action_spec),
        }


STATUS_EVERY_S = 5.0  # seconds between status lines of `emulate`
DEFAULT_OUT = Path("run.mp4")  # `view`'s video when --out is not given


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction in [0, 1]")
    return value


def _robot_command(args: argparse.Namespace, overrides: list[str]) -> str:
    """The `reverie-robot run` line that drives this emulated rig (`overrides`: the rig's own `--set`s)."""
    words = ["reverie-robot", "run", "--config", str(args.config)]
    ours = {item.split("=", 1)[0] for item in overrides}
    for item in args.set:
        if item.split("=", 1)[0] not in ours:
            words += ["--set", item]
    for item in overrides:
        words += ["--set", item]
    if args.write_calibration:
        words += ["--set", f"motors.calibration={args.write_calibration}"]
    return shlex.join(words)


def _status_line(cfg: Config, emulator: ServoEmulator, calibration: Calibration, elapsed: float) -> str:
    """Packets served, torque per servo and joint angles, read back from the emulated servos' registers."""
    servos = cfg.motors.servos
    ticks = np.array([emulator.register(s.id, "Present_Position") for s in servos])
    angles = calibration.to_radians([s.name for s in servos], ticks)
    on = emulator.torque_enabled()
    stats = dict(emulator.stats)
    shown = {k: v for k, v in stats.items() if k in ("received", "answered") or v}  # faults only once they occur
    packets = "packets " + " ".join(f"{k}={v}" for k, v in shown.items())
    joints = " ".join(f"{s.name}={a:+.2f}{'' if on.get(s.id) else '(off)'}" for s, a in zip(servos, angles))
    torque = f"torque on {sum(bool(on.get(s.id)) for s in servos)}/{len(servos)}"
    return f"[{elapsed:6.1f} s] {packets} | {torque} | {joints}"


def emulate_bus(cfg: Config, args: argparse.Namespace) -> int:
    """Serve an emulated servo bus (and the camera and IMU the config's emulator block asks for) until Ctrl-C,
    SIGTERM or --duration; print the ports and status lines."""
    from sim.emulation.rig import EmulatedRig, true_calibration

    calibration = true_calibration(cfg)
    if args.write_calibration:
        try:
            calibration.save(args.write_calibration)
        except OSError as exc:
            raise OSError(f"--write-calibration {args.write_calibration}: cannot write it ({exc})") from None
        print(f"calibration of the emulated servos written to {args.write_calibration}", flush=True)
    # The serial thread must answer within the host's timeout while the physics thread steps: hand the
    # interpreter lock over every 0.5 ms instead of every 5 ms.
    sys.setswitchinterval(0.0005)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmulatedRig(cfg, timing=not args.no_timing) as rig:
            emulator = rig.bus
            emulator.faults.drop_rate = args.drop_rate
            emulator.faults.corrupt_rate = args.corrupt_rate
            model = cfg.emulator.model or "kinematic (no physics: emulator.model is null)"
            print(f"emulated {cfg.motors.protocol} bus of {len(cfg.motors.servos)} servos at {cfg.motors.baud} "
                  f"bit/s, model {model}", flush=True)
            print(f"serial port: {emulator.port}", flush=True)
            if rig.camera_url:
                cam = cfg.emulator.camera
                print(f"camera: {rig.camera_url} ({cam.width}x{cam.height} MJPEG at {cam.fps:g} fps, rendered "
                      "while a client streams)", flush=True)
            if rig.imu_port:
                print(f"IMU port: {rig.imu_port} (BNO055 on the robot's base)", flush=True)
            print(f"run the robot with:\n  {_robot_command(args, rig.overrides())}", flush=True)
            if not args.write_calibration:
                print("  (it needs a calibration: run `reverie-robot calibrate` against this port, or restart this "
                      "with --write-calibration FILE and add --set motors.calibration=FILE)", flush=True)
            start = time.monotonic()
            end = start + args.duration if args.duration else float("inf")
            while not stop.is_set() and time.monotonic() < end:
                stop.wait(min(STATUS_EVERY_S, max(0.0, end - time.monotonic())))
                print(_status_line(cfg, emulator, calibration, time.monotonic() - start), flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("emulated bus closed", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reverie-sim", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, type=Path, help="a hardware_configs/*.yaml file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set control.hz=10 (repeatable)")

    v = sub.add_parser("view", help="run a policy and write a video (MP4 or GIF)")
    common(v)
    v.add_argument("--policy", default="random",
                   help="random, scripted, or a trained policy file (a run's policy.safetensors)")
    v.add_argument("--act", choices=("mode", "sample"), default="mode",
                   help="how a trained policy picks actions: its most likely one (mode), or drawn from its "
                        "distribution as while training (sample)")
    v.add_argument("--steps", type=flags.count, default=200, help="policy steps = video frames")
    v.add_argument("--out", type=Path, default=None,
                   help=f"output video (.mp4 or .gif; default {DEFAULT_OUT}, or {DEFAULT_OUT.stem}-2.mp4 ... if taken)")
    v.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    v.add_argument("--size", type=flags.pixels, default=256, help="height and width of the scene view, pixels")
    v.add_argument("--seed", type=flags.seed, default=0, help="seed of the random policy")
    v.add_argument("--episodes", type=flags.count, default=None,
                   help="instead of --steps: run until this many episodes have ended")

    s = sub.add_parser("specs", help="print the observation and action specs as JSON")
    common(s)

    e = sub.add_parser("emulate", help="serve an emulated servo bus (PyBullet physics) on a pseudo-terminal")
    common(e)
    e.add_argument("--no-timing", action="store_true", help="reply at once instead of at the bus's wire speed")
    e.add_argument("--drop-rate", type=_rate, default=0.0, metavar="R", help="fraction of replies never sent")
    e.add_argument("--corrupt-rate", type=_rate, default=0.0, metavar="R",
                   help="fraction of replies sent with a wrong checksum/CRC")
    e.add_argument("--write-calibration", type=Path, default=None, metavar="FILE",
                   help="write the emulated servos' true calibration here (skips `reverie-robot calibrate`)")
    e.add_argument("--duration", type=flags.seconds, default=None, metavar="S",
                   help="stop after this many seconds (default: serve until Ctrl-C or SIGTERM)")
    return parser


def _not_simulated(cfg: Config, config: Path, command: str) -> str | None:
    """Why `view` and `specs` cannot build this config's robot (a real robot's or a Gymnasium env's), else None."""
    if cfg.task in TASKS:
        return None
    simulated = ", ".join(TASKS)
    if cfg.backend == "servo":
        return (f"{config}: task {cfg.task!r} runs on a real robot (backend {cfg.backend!r}); `{command}` builds only "
                f"the simulated tasks ({simulated}). Without the hardware, run it on an emulated bus: "
                f"`reverie-sim emulate --config {config}`, then the `reverie-robot run` line it prints")
    return (f"{config}: backend {cfg.backend!r} ({cfg.gym_id or cfg.task}) is not a simulated robot; `{command}` "
            f"builds only the simulated tasks ({simulated}); train a Gymnasium env with "
            f"`reverie-learner train --config {config}`")


def _output(args: argparse.Namespace) -> Path | str:
    """Where `view` writes its video, or why it may not (an existing file is overwritten only with --force)."""
    if args.out is None:
        out = free_name(DEFAULT_OUT)
        if out != DEFAULT_OUT:
            print(f"{DEFAULT_OUT} exists: writing {out} (--out names the file, --force overwrites)", file=sys.stderr)
        return out
    if args.out.suffix.lower() not in FORMATS:
        return f"--out {args.out}: expected a name ending in .mp4 or .gif"
    if args.out.exists() and not args.force:
        return f"--out {args.out} exists; add --force to overwrite it, or name another file"
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"reverie-sim: {exc}", file=sys.stderr)
        return 2
    if args.command in ("view", "specs") and (why := _not_simulated(cfg, args.config, args.command)):
        print(f"reverie-sim {args.command}: {why}", file=sys.stderr)
        return 2
    if args.command == "specs":
        print(json.dumps(specs(cfg), indent=2))
        return 0
    if args.command == "emulate":
        if cfg.motors is None:
            print(f"reverie-sim: {args.config}: no motors block, so there is no servo bus to emulate "
                  "(use a servo config such as hardware_configs/so101_arm.yaml)", file=sys.stderr)
            return 2
        try:
            return emulate_bus(cfg, args)
        except (ValueError, OSError, RuntimeError) as exc:  # a model or baud the servos lack, an unwritable file
            print(f"reverie-sim emulate: {exc}", file=sys.stderr)
            return 2
    out = _output(args)
    if isinstance(out, str):
        print(f"reverie-sim: {out}", file=sys.stderr)
        return 2
    length = {"steps": args.steps} if args.episodes is None else {"episodes": args.episodes}
    try:
        result = view(cfg, args.policy, out, args.size, args.seed, act=args.act,
                      warn=lambda text: print(f"reverie-sim: warning: {text}", file=sys.stderr), **length)
    except ValueError as exc:
        print(f"reverie-sim: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the video or its config beside it cannot be written there
        print(f"reverie-sim: --out {out}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if partial := result.get("partial_episode"):
        counted = (f"mean_return counts the {result['episodes']} complete episodes only" if result["episodes"]
                   else "no episode ended, so mean_return is null")
        print(f"the last episode is partial ({partial['steps']} of {partial['of']} steps, return "
              f"{partial['return']:g}); {counted}")
    print(f"video written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
