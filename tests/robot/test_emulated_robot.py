"""The line `reverie-sim emulate` prints runs as printed: the SO-101 robot on the emulated bus, camera and all, acts
for several seconds without stopping on a bus fault (a single late reply on a loaded host is a missed tick the
safety layer rides through). The two run as the guide starts them (docs/hardware.md, step 5): the emulator in one
terminal, the robot in a second one, each its own session.

Nothing is added to the printed line (issue 23: only `--set motors.timeout_margin_ms=100`, which the tests alone
knew, made it run). The robot's spool goes to XDG_STATE_HOME, set to a temporary directory, as a person's would go
to ~/.local/state. No speed is asserted; the waits below only bound how long a failure takes to show.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SO101 = ROOT / "hardware_configs" / "so101_arm.yaml"
START_S = 300  # the emulator and the robot import torch, pybullet and OpenCV on a busy machine
STATUS = re.compile(r"so101_arm: (\d+) steps")  # the robot's status line, every control.status_every_s (10 s)


def read_until(log: Path, pattern: re.Pattern[str], proc: subprocess.Popen, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if match := pattern.search(text):
            return match
        assert proc.poll() is None, f"exited ({proc.returncode}) before {pattern.pattern!r}:\n{text[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern.pattern!r} within {timeout} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_printed_robot_line_runs_without_a_bus_fault(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    emulator_log, robot_log = tmp_path / "emulate.log", tmp_path / "robot.log"
    emulator = subprocess.Popen(
        ["bash", "-c", f"exec reverie-sim emulate --config {SO101} --write-calibration {tmp_path / 'emulated.json'}"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=open(emulator_log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True)  # the guide's first terminal: a session of its own
    robot = None
    try:
        line = read_until(emulator_log, re.compile(r"run the robot with:\n\s*(reverie-robot run .*)\n"), emulator,
                          START_S).group(1)
        robot = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                 stdout=open(robot_log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        steps = int(read_until(robot_log, STATUS, robot, START_S).group(1))  # after control.status_every_s of control
        stop(robot)
    finally:
        if robot is not None:
            stop(robot, signal.SIGKILL)
        stop(emulator, signal.SIGTERM)
    text = robot_log.read_text()
    summary = json.loads(next(ln for ln in reversed(text.splitlines()) if ln.startswith("{")))
    assert summary["stopped"] == "interrupted" and summary["steps"] >= steps > 0, summary
    # A late reply is a missed tick the safety layer rides through (it stops the robot at the limit, e.g. 3 in a
    # row); on a loaded 2-core host one can happen. What the issue saw was the robot *stopping* on bus_fault.
    faults = [ln for ln in text.splitlines() if "bus_fault" in ln]
    assert all(re.search(r"missed tick (\d+) of (\d+)", ln) for ln in faults), text[-4000:]
    assert not any(a == b for a, b in (re.search(r"missed tick (\d+) of (\d+)", ln).groups() for ln in faults)), \
        text[-4000:]
    assert "torque on 0/6" in emulator_log.read_text().strip().splitlines()[-2]  # torque off at the robot's exit
