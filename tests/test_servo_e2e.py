"""The whole real-hardware path without hardware: `reverie-robot run` with the SO-101 config drives an
emulated Feetech bus (PyBullet physics behind the real protocol) and learns with `reverie-learner serve`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from learner.config import load_config
from learner.replay.chunk import ChunkError, read_chunk
from robot.demo import free_port
from sim.servo_emulation import emulate, true_calibration

ROOT = Path(__file__).resolve().parents[1]
SO101 = ROOT / "hardware_configs" / "so101_arm.yaml"
SECONDS = 30


def test_so101_on_the_emulated_bus_learns_with_a_learner(tmp_path):
    cal = tmp_path / "calibration.json"
    cfg = load_config(SO101, [f"motors.calibration={cal}"])
    true_calibration(cfg).save(cal)
    address = f"tcp://127.0.0.1:{free_port()}"
    common = ["--set", f"motors.calibration={cal}", "--set", "safety.estop_key=false"]
    learner_cmd = [sys.executable, "-m", "learner.cli", "serve", "--config", str(SO101), "--logdir",
                   str(tmp_path / "learner"), "--bind", address, "--quiet", "--set", "train.prefill=100",
                   "--set", "train.train_ratio=32", "--set", "link.weights_every_updates=1",
                   "--set", "link.weights_every_s=1", "--set", "dreamer.threads=1", *common]
    with emulate(cfg) as emulator, open(tmp_path / "learner.log", "w") as learner_log:
        learner = subprocess.Popen(learner_cmd, cwd=ROOT, stdout=learner_log, stderr=subprocess.STDOUT)
        try:
            robot_cmd = [sys.executable, "-m", "robot.cli", "run", "--config", str(SO101), "--learner", address,
                         "--spool", str(tmp_path / "spool"), "--duration", str(SECONDS),
                         "--set", f"motors.port={emulator.port}", *common]
            robot = subprocess.run(robot_cmd, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120)
            assert robot.returncode == 0, robot.stderr[-3000:]
            summary = json.loads(robot.stdout.strip().splitlines()[-1])
            torque = emulator.torque_enabled()
        finally:
            learner.send_signal(signal.SIGINT)
            learner.wait(120)
    assert not any(torque.values())  # the run ended with torque off
    assert summary["stopped"] == "time limit reached" and summary["spool_pending"] == 0
    assert summary["weights_swaps"] >= 1 and summary["acting_version"] >= 1, summary  # learned weights came back
    assert summary["period_error_p99"] < 1.0  # it kept a control rate (a loose sanity bound, not a benchmark)
    steps, moved = 0, []
    for path in sorted((tmp_path / "learner" / "replay").glob("*.npz")):
        try:
            meta, arrays, _, _ = read_chunk(path)
        except ChunkError:
            continue
        steps += len(arrays["joint_pos"])
        moved.append(np.ptp(arrays["joint_pos"], axis=0))
        assert meta.task == "joint_reach"
    assert steps == summary["steps"]  # every step the robot took is in the learner's replay
    assert np.max(moved) > 0.05  # the physics behind the emulated servos moved
    time.sleep(0)
