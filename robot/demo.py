"""`make demo`: the whole stack on one machine: a learner process and one simulated robot process.

    python -m robot.demo --seconds 300 --out runs/demo

The robot (ArmReach in PyBullet) streams experience to the learner over ZeroMQ on loopback and
acts with the weights the learner sends back; the learner shows its progress and a per-robot
status table. Ctrl-C or the time limit stops both cleanly. At the end a video of the learned
policy is rendered and the paths of the videos, curves and checkpoints are printed.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robot.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the simulated robot and learner config")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--seconds", type=float, default=300.0, help="how long the robot runs")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    py = sys.executable
    learner_cmd = [py, "-m", "learner.cli", "serve", "--config", str(args.config), "--logdir", str(out / "learner"),
                   "--bind", address, "--duration", str(args.seconds + 60), "--set", f"train.steps={10**9}"]
    robot_cmd = [py, "-m", "robot.cli", "run", "--config", str(args.config), "--learner", address,
                 "--spool", str(out / "spool"), "--duration", str(args.seconds), "--verbose"]
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
    robot_summary = _last_json(out / "robot.log")
    policy = out / "learner" / "policy.safetensors"
    video = out / "videos" / "learned_policy.mp4"
    if policy.is_file():
        video.parent.mkdir(exist_ok=True)
        subprocess.run([py, "-m", "sim.cli", "view", "--config", str(args.config), "--policy", str(policy),
                        "--episodes", "3", "--out", str(video)], cwd=ROOT, check=False)
    print("\ndemo finished")
    if robot_summary:
        print(f"  robot: {robot_summary.get('steps')} steps, {robot_summary.get('episodes')} episodes, acted with "
              f"weights v{robot_summary.get('acting_version')}, control period error p99 "
              f"{100 * robot_summary.get('period_error_p99', 0):.1f}%")
    for label, path in [("learning curve", out / "learner" / "learning_curve.png"),
                        ("metrics", out / "learner" / "metrics.jsonl"),
                        ("checkpoints", out / "learner" / "checkpoints"), ("policy", policy),
                        ("video of the learned policy", video), ("robot log", out / "robot.log"),
                        ("replay", out / "learner" / "replay")]:
        print(f"  {label:<28} {path}{'' if path.exists() else '  (not written)'}")
    return 0 if code_learner == 0 else code_learner


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
