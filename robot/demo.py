"""`make demo`: the whole stack on one machine: a learner process and one simulated robot process.

    python -m robot.demo --seconds 300 --out runs/demo

The robot (ArmReach in PyBullet, a smaller variant than the README's: see `describe_task`) streams
experience to the learner over ZeroMQ on loopback and acts with the weights the learner sends back; the
learner shows its progress and a per-robot status table. Ctrl-C or the time limit stops both cleanly.
Then the learned policy, the random policy and the scripted controller each act a few episodes of the
same task (`reverie-sim view`, one video each), a verdict line says whether the robot learned, and
summary.json and learning_curve.png hold the numbers. The robot package imports no simulator or learner
code, so those steps run as their own commands.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
README_ARM_REACH = ROOT / "hardware_configs" / "sim_arm_reach.yaml"  # the ArmReach the README describes
EVAL_EPISODES = 10
BASELINES = ("random", "scripted")  # what the learned policy is compared with (`reverie-sim view --policy`)
LEARNED_SHARE = 0.5  # "learned": at least half of the way from the random policy's return to the scripted one's
PARTLY_SHARE = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen, grace: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def describe_task(cfg: Config, readme: Config) -> str:
    """What the demo trains and how it differs from the README's ArmReach (it is made to learn in minutes on a
    CPU: no pixels to learn from, one place to reach, short episodes)."""
    if cfg.task != readme.task:
        return f"demo task: {cfg.name} ({cfg.task})"

    def aspects(c: Config) -> list[str]:
        t = c.arm_reach
        return ["camera image and joint readings" if c.camera.enabled else "joint readings only, no camera",
                f"a fixed target at {list(t.target_low)} m" if t.target_low == t.target_high
                else "a target drawn at random every episode",
                f"{c.control.episode_steps}-step episodes of {c.control.episode_steps / c.control.hz:g} s"]

    differ = [f"{a} (README: {b})" for a, b in zip(aspects(cfg), aspects(readme)) if a != b]
    head = f"demo task: ArmReach as {cfg.name}"
    return f"{head}, smaller than the README's {readme.name} to learn in minutes: " + "; ".join(differ) if differ \
        else head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robot.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the simulated robot and learner config")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--seconds", type=float, default=300.0, help="how long the robot runs")
    parser.add_argument("--eval-episodes", type=int, default=EVAL_EPISODES,
                        help="episodes each policy acts in the final comparison")
    args = parser.parse_args(argv)
    try:
        cfg, readme = load_config(args.config), load_config(README_ARM_REACH)
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    py = sys.executable
    learner_cmd = [py, "-m", "learner.cli", "serve", "--config", str(args.config), "--logdir", str(out / "learner"),
                   "--bind", address, "--duration", str(args.seconds + 60), "--set", f"train.steps={10**9}"]
    robot_cmd = [py, "-m", "robot.cli", "run", "--config", str(args.config), "--learner", address,
                 "--spool", str(out / "spool"), "--duration", str(args.seconds), "--verbose"]
    print(describe_task(cfg, readme), flush=True)
    print(f"demo: learner and simulated robot on {address} for {args.seconds:.0f} s (Ctrl-C stops both)", flush=True)
    # Ctrl-C reaches both children (same process group) and each stops itself cleanly; the demo
    # itself only waits for them.
    signal.signal(signal.SIGINT, lambda *_: print("\ndemo: stopping ...", flush=True))
    with open(out / "robot.log", "w") as robot_log:
        learner = subprocess.Popen(learner_cmd, cwd=ROOT)
        time.sleep(1.0)
        robot = subprocess.Popen(robot_cmd, cwd=ROOT, stdout=robot_log, stderr=subprocess.STDOUT)
        while robot.poll() is None:
            try:
                robot.wait(1.0)
            except subprocess.TimeoutExpired:
                if learner.poll() is not None:
                    print("demo: the learner exited early; stopping the robot", flush=True)
                    _stop(robot, 10.0)
        code_learner = _stop(learner, 120.0)
    summary = report(args.config, describe_task(cfg, readme), out, args.eval_episodes, _last_json(out / "robot.log"))
    print("\ndemo finished")
    print(f"  verdict: {summary['verdict']}")
    robot_summary = summary["robot"]
    if robot_summary:
        print(f"  robot: {robot_summary.get('steps')} steps, {robot_summary.get('episodes')} episodes, acted with "
              f"weights v{robot_summary.get('acting_version')}, control period error p99 "
              f"{100 * robot_summary.get('period_error_p99', 0):.1f}%")
    print(f"  look first at {out / 'learning_curve.png'} and {out / SUMMARY}; every scalar: "
          f"{Path(sys.executable).parent / 'tensorboard'} --logdir {out / 'learner'}")
    for label, path in outputs(out):
        print(f"  {label:<28} {path}{'' if path.exists() else '  (not written)'}")
    return 0 if code_learner == 0 else code_learner


SUMMARY = "summary.json"


def outputs(out: Path) -> list[tuple[str, Path]]:
    """What a demo leaves in `out`, as README's table lists it."""
    videos = out / "videos"
    return [("verdict and numbers", out / SUMMARY), ("learning curve", out / "learning_curve.png"),
            ("video, learned policy", videos / "learned_policy.mp4"),
            ("video, random policy", videos / "random_policy.mp4"),
            ("video, scripted controller", videos / "scripted_policy.mp4"),
            ("learner run directory", out / "learner"), ("metrics", out / "learner" / "metrics.jsonl"),
            ("TensorBoard scalars", out / "learner" / "tb"), ("checkpoints", out / "learner" / "checkpoints"),
            ("policy", out / "learner" / "policy.safetensors"), ("robot log", out / "robot.log")]


def report(config: Path, task: str, out: Path, episodes: int, robot_summary: dict | None) -> dict[str, Any]:
    """After the run: compare the policies, say whether the robot learned, draw the curve, write summary.json."""
    policy = out / "learner" / "policy.safetensors"
    learner = _read_json(out / "learner" / SUMMARY) or {}
    step = learner.get("received_steps") or (robot_summary or {}).get("steps") or 0
    if policy.is_file():
        print(f"demo: the learned policy, the random policy and the scripted controller act {episodes} episodes "
              "each ...", flush=True)
        results = evaluate(config, policy, out / "videos", episodes)
        text, share = verdict(results)
    else:
        results, share = {}, None
        text = f"no verdict: the learner wrote no policy ({policy} is missing)"
    _draw_curve(out, step, results)
    summary = {"verdict": text, "learned_share": share, "config": str(config), "task": task,
               "learner_steps": step, "updates": learner.get("updates"),
        "evaluation": {"episodes": episodes, "learned_acts": "sampled actions, as while training", **results},
        "robot": robot_summary, "learner": learner}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(config: Path, policy: Path, videos: Path, episodes: int) -> dict[str, dict[str, Any]]:
    """`episodes` episodes of the learned policy, the random policy and the scripted controller on the same task
    from the same start states, each through `reverie-sim view` with its video. The learned policy samples its
    actions, as it acted while it trained (and as `reverie-learner train` evaluates for eval/return)."""
    runs = {"learned": [str(policy), "--act", "sample"], **{name: [name] for name in BASELINES}}
    results = {}
    for name, flags in runs.items():
        video = videos / f"{name}_policy.mp4"
        cmd = [sys.executable, "-m", "sim.cli", "view", "--config", str(config), "--episodes", str(episodes),
               "--out", str(video), "--force", "--policy", *flags]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        warned = [line for line in done.stderr.splitlines() if "warning:" in line]
        if done.returncode or not done.stdout.startswith("{"):
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            results[name] = {"error": why}
            print(f"demo: evaluating the {name} policy failed: {why}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.splitlines()[0])
        results[name] = {k: row[k] for k in ("mean_return", "success_rate", "returns", "video") if k in row}
        for line in warned:
            print(f"demo: {line}", file=sys.stderr)
    return results


def verdict(results: dict[str, dict[str, Any]]) -> tuple[str, float | None]:
    """One line saying whether the learned policy learned, by where its return lies between the random
    policy's and the scripted controller's (the share of that gap it closed) and its success rate; and the share."""
    failed = [name for name in ("learned", *BASELINES) if "error" in results.get(name, {"error": "not run"})]
    if failed:
        return f"no verdict: the {', '.join(failed)} evaluation failed", None
    learned, random, scripted = (results[k]["mean_return"] for k in ("learned", *BASELINES))
    if None in (learned, random, scripted):
        return "no verdict: an evaluation ended no episode", None
    gap = scripted - random
    share = (learned - random) / gap if gap > 0 else None
    success = [results[k].get("success_rate") for k in ("learned", *BASELINES)]
    if share is None:
        word = "no verdict (the scripted controller does no better than the random policy)"
    elif share >= LEARNED_SHARE and (success[0] is None or success[0] >= 0.5):
        word = "learned"
    elif share >= PARTLY_SHARE:
        word = "partly learned"
    else:
        word = "not learned yet"
    parts = []
    if None not in success:
        parts.append("success {:.0%} (random {:.0%}, scripted {:.0%})".format(*success))
    parts.append(f"return {learned:.2f} (random {random:.2f}, scripted {scripted:.2f})")
    text = f"{word}: {', '.join(parts)}"
    if share is not None:
        text += f"; {share:.0%} of the way from the random policy's return to the scripted controller's"
    if word != "learned":
        text += " (it needs a longer run: make demo DEMO_SECONDS=1800, which resumes from this one)"
    return text, share


def _draw_curve(out: Path, step: int, results: dict[str, dict[str, Any]]) -> None:
    """The learner's return curve with the evaluation at the last step and the baselines, as `train` draws them
    (by learner.plots, in its own process: the robot package carries no plotting)."""
    cmd = [sys.executable, "-m", "learner.plots", str(out / "learner" / "metrics.jsonl"),
           "--out", str(out / "learning_curve.png"), "--title", "Demo: learning curve and final evaluation"]
    if (learned := results.get("learned", {}).get("mean_return")) is not None:
        cmd += ["--point", "eval/return", str(step), f"{learned:.3f}"]
    for name, label in (("random", "random policy"), ("scripted", "scripted controller")):
        if (value := results.get(name, {}).get("mean_return")) is not None:
            cmd += ["--baseline", label, f"{value:.3f}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"demo: no learning curve: {(done.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json(path: Path) -> dict | None:
    for line in reversed(path.read_text().splitlines() if path.is_file() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


if __name__ == "__main__":
    raise SystemExit(main())
