"""`reverie-sim`: look at the simulated robots without a display.

    reverie-sim view --config hardware_configs/sim_quadruped_walk.yaml --policy random --steps 200 --out run.mp4
    reverie-sim specs --config hardware_configs/sim_arm_reach.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from learner.config import Config, ConfigError, load_config, write_resolved
from learner.video import FORMATS, VideoWriter, side_by_side
from robot.interface import ArraySpec, DiscreteSpec
from sim.tasks import make_policy, make_robot


@dataclass
class EpisodeStats:
    returns: list[float] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "episodes": len(self.returns),
            "mean_return": float(np.mean(self.returns)) if self.returns else None,
            "returns": [round(r, 3) for r in self.returns],
        }
        if self.successes:
            out["success_rate"] = float(np.mean(self.successes))
        return out


def view(cfg: Config, policy_name: str, steps: int, out: Path, size: int, seed: int) -> dict[str, object]:
    """Run `steps` policy steps (resetting at episode ends) and write one video frame per step."""
    write_resolved(cfg, out.parent, name=f"{out.name}.config.yaml")
    stats = EpisodeStats()
    with make_robot(cfg) as robot, VideoWriter(out, fps=cfg.control.hz) as video:
        policy = make_policy(policy_name, robot, seed=seed)
        obs = robot.reset(seed=cfg.seed)
        ret = 0.0
        for _ in tqdm(range(steps), desc=f"{cfg.name} {policy_name}", unit="step", file=sys.stderr):
            robot.send(policy(obs))
            obs = robot.observe()
            ret += float(obs["reward"])
            video.append(side_by_side(robot.render_frame(size, size), obs.get("image")))
            if obs["is_last"]:
                stats.returns.append(ret)
                if "success" in robot.info:
                    stats.successes.append(bool(robot.info["success"]))
                obs, ret = robot.reset(), 0.0
        frames = video.frames
    return {"video": str(out), "frames": frames, **stats.summary()}


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
    v.add_argument("--steps", type=int, default=200, help="policy steps = video frames")
    v.add_argument("--out", type=Path, default=Path("run.mp4"), help="output video (.mp4 or .gif)")
    v.add_argument("--size", type=int, default=256, help="height and width of the scene view, pixels")
    v.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    v.add_argument("--episodes", type=int, default=None,
                   help="instead of --steps: this many times control.episode_steps")

    s = sub.add_parser("specs", help="print the observation and action specs as JSON")
    common(s)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"reverie-sim: {exc}", file=sys.stderr)
        return 2
    if args.command == "specs":
        print(json.dumps(specs(cfg), indent=2))
        return 0
    if args.out.suffix.lower() not in FORMATS:
        print(f"reverie-sim: --out {args.out}: expected a name ending in .mp4 or .gif", file=sys.stderr)
        return 2
    steps = args.steps if args.episodes is None else args.episodes * cfg.control.episode_steps
    if steps < 1:
        print("reverie-sim: --steps must be at least 1", file=sys.stderr)
        return 2
    try:
        result = view(cfg, args.policy, steps, args.out, args.size, args.seed)
    except ValueError as exc:
        print(f"reverie-sim: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    print(f"video written to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
