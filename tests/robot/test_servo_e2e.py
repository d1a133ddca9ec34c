"""The whole real-hardware path without hardware: `reverie-robot run` with the SO-101 config drives an
emulated Feetech bus (PyBullet physics behind the real protocol) and learns with `reverie-learner serve`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.link.protocol import decode
from learner.replay.chunk_file import ChunkError, read_chunk
from robot.demo import free_port
from robot.link.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
SO101 = ROOT / "hardware_configs" / "so101_arm.yaml"
SECONDS = 30


def start_emulator(tmp: Path, cal: Path) -> tuple[subprocess.Popen, str]:
    """`reverie-sim emulate` in its own process, as a real bus is its own device."""
    cmd = [sys.executable, "-m", "sim.cli", "emulate", "--config", str(SO101), "--write-calibration", str(cal)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"serial port: (\S+)", line)
        if match:
            return proc, match.group(1)
    raise AssertionError(f"the emulator exited ({proc.wait()}) without printing its port")


def test_so101_on_the_emulated_bus_learns_with_a_learner(tmp_path):
    cal = tmp_path / "calibration.json"
    address = f"tcp://127.0.0.1:{free_port()}"
    # A loaded CI machine may leave the emulator process unscheduled for tens of ms: allow for it.
    common = ["--set", f"motors.calibration={cal}", "--set", "safety.estop_key=false",
              "--set", "motors.timeout_margin_ms=100", "--set", "motors.read_budget_ms=400",
              "--set", "task=joint_reach", "--set", "camera.enabled=false",
              "--set", "sensors.camera=null", "--set", "sensors.imu=null"]
    learner_cmd = [sys.executable, "-m", "learner.cli", "serve", "--config", str(SO101), "--logdir",
                   str(tmp_path / "learner"), "--bind", address, "--quiet", "--set", "train.prefill=100",
                   "--set", "train.train_ratio=32", "--set", "link.weights_every_updates=1",
                   "--set", "link.weights_every_s=1", "--set", "dreamer.threads=1", *common]
    emulator, port = start_emulator(tmp_path, cal)
    learner = subprocess.Popen(learner_cmd, cwd=ROOT, stdout=open(tmp_path / "learner.log", "w"),  # noqa: SIM115
                               stderr=subprocess.STDOUT)
    try:
        robot_cmd = [sys.executable, "-m", "robot.cli", "run", "--config", str(SO101), "--learner", address,
                     "--spool", str(tmp_path / "spool"), "--duration", str(SECONDS),
                     "--set", f"motors.port={port}", *common]
        robot = subprocess.run(robot_cmd, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120)
    finally:
        learner.send_signal(signal.SIGINT)
        emulator.send_signal(signal.SIGTERM)
        emulator_out = emulator.communicate(timeout=60)[0]
        learner.wait(120)
    assert robot.returncode == 0, robot.stderr[-3000:]
    summary = json.loads(robot.stdout.strip().splitlines()[-1])
    status = [ln for ln in emulator_out.splitlines() if "torque on" in ln][-1]
    assert "torque on 0/6" in status, status  # the run ended with torque off on every servo
    assert summary["stopped"] == "time limit reached"
    assert summary["weights_swaps"] >= 1 and summary["acting_version"] >= 1, summary  # learned weights came back
    steps, moved = 0, []
    for path in sorted((tmp_path / "learner" / "replay").glob("*.npz")):
        try:
            meta, arrays, _, _ = read_chunk(path)
        except ChunkError:
            continue
        steps += len(arrays["joint_pos"])
        moved.append(np.ptp(arrays["joint_pos"], axis=0))
        assert meta.task == "joint_reach"
    # Every step the robot took is in the learner's replay, or still in the robot's spool: a chunk whose
    # acknowledgement had not arrived when the robot stopped waits there (the learner drops it as a duplicate
    # on the next run if it had stored it).
    spool = Spool(tmp_path / "spool", 2**30)
    spooled = sum(len(decode(spool.load(seq)).arrays["reward"]) for seq in spool.pending())
    assert spool.count == summary["spool_pending"]
    assert summary["steps"] - spooled <= steps <= summary["steps"]
    assert np.max(moved) > 0.05  # the physics behind the emulated servos moved
