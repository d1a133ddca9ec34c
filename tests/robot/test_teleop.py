"""Leader-arm teleoperation (robot/teleop.py) on two emulated Feetech buses (real driver, real protocol bytes on
pseudo-terminals): the leader's torque stays off and a person's moves of it are read; the SO-101 follower copies
them through its safety layer (never more than `safety.max_step` per tick, never past its limits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from teleop_helpers import Pair

from core.interface import RobotError
from robot.servo.robot import ServoRobot
from robot.teleop import LeaderArm, LeaderControl


@pytest.fixture
def pair(tmp_path: Path):
    p = Pair(tmp_path)
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["delta", "absolute"])
def test_the_follower_copies_the_leader_through_its_safety_layer(tmp_path: Path, mode: str) -> None:
    pair = Pair(tmp_path, f"motors.action_mode={mode}")
    try:
        with ServoRobot(pair.follower_cfg, sensors=False) as robot, LeaderArm(pair.leader_cfg, robot.names) as leader:
            assert not any(pair.leader_bus.torque_enabled().values())  # a person moves it: torque off
            control = LeaderControl(leader, robot)
            robot.reset()
            # A person moves the leader: shoulder_pan and elbow well inside the limits, wrist_roll past the
            # follower's upper limit (2.7 rad).
            target = pair.leader_home.copy()
            target[[0, 2, 4]] = [0.6, 0.2, 3.0]
            for i in (0, 2, 4):
                pair.leader_plant.move(i, target[i])
            assert np.allclose(leader.read(), target, atol=0.01)  # one tick's resolution, calibrated radians
            max_step = pair.follower_cfg.safety.max_step
            previous = robot.goal
            for _ in range(80):
                obs = robot.observe()
                action = control(obs)
                assert action.dtype == np.float32 and np.all(np.abs(action) <= 1.0)
                robot.send(action)
                goal = robot.goal
                assert np.all(np.abs(goal - previous) <= max_step + 1e-9)  # the safety layer's cap
                assert np.all(goal >= robot.lower - 1e-9) and np.all(goal <= robot.upper + 1e-9)
                previous = goal
            expected = np.clip(target, robot.lower, robot.upper)
            tolerance = 0.01 if mode == "delta" else 0.01 + (robot.upper - robot.lower).max() * 1e-6
            assert np.allclose(robot.goal, expected, atol=tolerance), (robot.goal, expected)
            assert robot.goal[4] == pytest.approx(robot.upper[4])  # followed to the limit, not past it
            assert not any(pair.leader_bus.torque_enabled().values())
    finally:
        pair.close()


def test_a_leader_without_the_followers_joints_or_servos_is_refused_by_name(pair: Pair) -> None:
    with pytest.raises(RobotError, match=r"no servo for the follower's joint\(s\) \['elbow'\]"):
        LeaderArm(pair.leader_cfg, ["shoulder_pan", "elbow"])
    pair.leader_bus.faults.silent.add(3)
    with pytest.raises(RobotError, match=r"servo 3 \(elbow_flex\) does not answer"):
        LeaderArm(pair.leader_cfg, ["shoulder_pan", "elbow_flex"])
