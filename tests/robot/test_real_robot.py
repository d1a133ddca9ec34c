"""The three real tasks on the whole robot stack, against emulated hardware: `ServoRobot` drives the emulated
servo bus (PyBullet behind it), reads the emulated camera's MJPEG stream and, for the quadruped, the emulated
BNO055; rewards and success come from tracked markers and the IMU, over scripted runs. The operator prompt
is driven through a real pseudo-terminal.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.config import Config, load_config
from robot.servo.robot import ServoRobot
from sim.emulation.rig import EmulatedRig, true_calibration

ROOT = Path(__file__).resolve().parents[2]
# Joint goals that bring the SO-101's effector marker next to the target marker (as tests/test_scene_render.py).
SO101_REACH = {"shoulder_lift": 0.4, "elbow_flex": -0.1, "wrist_flex": 1.4}
# A loaded CI machine pauses threads (the emulator shares this process): room for the watchdog and the bus.
ROOM = ("safety.watchdog_s=2.0", "motors.timeout_margin_ms=100", "motors.read_budget_ms=400")


def configs(name: str, tmp: Path, *extra: str) -> tuple[Config, list[str]]:
    base = load_config(ROOT / "hardware_configs" / f"{name}.yaml", list(extra))
    true_calibration(base).save(tmp / "calibration.json")
    return base, [f"motors.calibration={tmp / 'calibration.json'}", *ROOM, *extra]


@pytest.fixture
def so101(tmp_path) -> Iterator[tuple[EmulatedRig, Config]]:
    base, extra = configs("so101_arm", tmp_path)
    with EmulatedRig(base) as rig:
        cfg = load_config(ROOT / "hardware_configs" / "so101_arm.yaml",
                          [*rig.overrides(), "safety.estop_key=false", *extra])
        yield rig, cfg


def drive_to(robot: ServoRobot, goal: dict[str, float], steps: int) -> list[dict[str, np.ndarray]]:
    """Delta actions toward joint `goal` (others hold), one per control period; the observations."""
    target = np.array([goal.get(n, h) for n, h in zip(robot.names, robot.home)])
    out = []
    for _ in range(steps):
        start = time.monotonic()
        error = target - robot._goal
        robot.send(np.clip(error / robot.cfg.motors.joint_delta, -1.0, 1.0))
        time.sleep(max(0.0, robot.period - (time.monotonic() - start)))
        out.append(robot.observe())
    return out


def test_arm_reach_to_a_marker_rewards_and_success_on_a_scripted_reach(so101) -> None:
    rig, cfg = so101
    cfg = cfg.model_copy(update={"control": cfg.control.model_copy(update={"episode_steps": 1000})})
    with ServoRobot(cfg) as robot:
        first = robot.reset()
        assert first["image"].shape == (64, 64, 3) and first["image"].dtype == np.uint8
        truth = rig.scene.truth()
        target_truth = truth[cfg.marker_reach.target_id]
        assert np.linalg.norm(first["target_pos"] - target_truth) < 0.02
        obs = drive_to(robot, SO101_REACH, steps=60)
        obs += drive_to(robot, SO101_REACH, steps=20)  # hold there: the camera catches up
        rewards = np.array([float(o["reward"]) for o in obs])
        success = [bool(o["log/success"]) for o in obs]
        effector = rig.scene.truth()[cfg.marker_reach.effector_id]
        true_distance = float(np.linalg.norm(effector - target_truth))
    print(f"\nso101 marker_reach: reward {rewards[0]:.3f} -> {rewards[-1]:.3f} (true final distance "
          f"{true_distance:.3f} m), success from step {success.index(True) if True in success else None}")
    assert not any(bool(o["is_last"]) for o in obs), [(i, robot.info) for i, o in enumerate(obs) if o["is_last"]][:3]
    assert rewards[-1] > rewards[0] + 0.1
    assert rewards[-1] == pytest.approx(-true_distance, abs=0.02)
    assert success[-1] and not success[0]


class Person(threading.Thread):
    """The operator at the robot's terminal: answers every request for help with `c` after `fix()` (the
    scene put right). A loaded machine may make the robot lose sight of the cube and ask when the test did
    not expect it: a patient person answers that too, and a test waiting on a person never hangs."""

    def __init__(self, robot: ServoRobot, master: int, fix) -> None:
        super().__init__(daemon=True)
        self.robot, self.master, self.fix = robot, master, fix
        self.answered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            if self.robot.operator.paused and self.answered < 10:
                self.fix()
                time.sleep(0.3)
                os.write(self.master, b"c")
                self.answered += 1
                while self.robot.operator.paused and not self.stop.wait(0.05):
                    pass


def test_pick_place_goal_alternates_and_a_person_is_asked_through_the_prompt(tmp_path) -> None:
    base, extra = configs("koch_arm", tmp_path)
    master, slave = os.openpty()
    with EmulatedRig(base) as rig, os.fdopen(slave, "r", closefd=True) as terminal:
        cfg = load_config(ROOT / "hardware_configs" / "koch_arm.yaml",
                          [*rig.overrides(), "safety.estop_key=true", *extra])
        regions = cfg.pick_place.regions
        size = base.emulator.object.size
        centre = [np.mean([r.low, r.high], axis=0) for r in regions]
        spot = {"cube": centre[0]}  # where the person puts the cube when asked
        with ServoRobot(cfg, stdin=terminal) as robot:
            person = Person(robot, master, lambda: rig.scene.set_object([*spot["cube"], size]))
            person.start()
            try:
                first = robot.reset()
                np.testing.assert_allclose(first["goal"], centre[1])
                assert not first["log/success"]
                before = float(robot.observe()["reward"])
                # a person (or a grasp the model cannot do) carries the cube into region B
                spot["cube"] = centre[1]
                rig.scene.set_object([*centre[1], size])
                placed = wait_for_obs(robot, lambda o: bool(o["log/success"]), "success in region B")
                assert float(placed["reward"]) > before + cfg.pick_place.success_bonus
                # next episode: the goal is region A, with no person needed
                second = robot.reset()
                np.testing.assert_allclose(second["goal"], centre[0])
                # the cube is knocked off both regions: the reset asks; the person puts it in A and presses c
                spot["cube"] = centre[0]
                asked = robot.operator.counts.get("requests", 0)
                rig.scene.set_object([-0.1, 0.35, size])
                robot.observe()
                third = robot.reset()
                assert robot.operator.counts["requests"] > asked and person.answered >= 1
                np.testing.assert_allclose(third["goal"], centre[1])
                assert not robot.estop.triggered.is_set()
                os.write(master, b"x")  # any other key: the e-stop
                deadline = time.monotonic() + 10
                while not robot.estop.triggered.is_set() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert robot.estop.triggered.is_set()
            finally:
                person.stop.set()
                person.join(5)
        assert not any(rig.bus.torque_enabled().values())
    os.close(master)


def wait_for_obs(robot: ServoRobot, condition, what: str, limit_steps: int = 100) -> dict[str, np.ndarray]:
    for _ in range(limit_steps):
        robot.send(np.zeros(len(robot.names)))
        time.sleep(robot.period)
        obs = robot.observe()
        if condition(obs):
            return obs
    raise AssertionError(f"no {what} within {limit_steps} steps")


def test_quadruped_stands_up_from_its_rest_pose_and_progress_needs_uprightness(tmp_path, caplog) -> None:
    base, extra = configs("servo_quadruped", tmp_path)
    with EmulatedRig(base) as rig:
        cfg = load_config(ROOT / "hardware_configs" / "servo_quadruped.yaml",
                          [*rig.overrides(), "safety.estop_key=false", "control.episode_steps=1000", *extra])
        with ServoRobot(cfg) as robot:
            first = robot.reset()
            rest = robot.task.reset_pose(robot.home)
            assert np.allclose(first["joint_pos"], rest, atol=0.15)  # folded
            np.testing.assert_allclose(first["imu_gravity"], [0, 0, -1], atol=0.15)
            obs = drive_to(robot, {}, steps=60)  # stand: every joint to its home (standing) pose
            standing = obs[-1]
            assert np.allclose(standing["joint_pos"], robot.home, atol=0.15)
            assert float(standing["reward"]) == pytest.approx(cfg.stand_walk.upright_weight, abs=0.15)
            # carried forward while upright (as if walking): progress adds to the reward
            pos, quat, _ = rig.plant.base_state()
            rig.plant.set_base(pos + [0.10, 0.0, 0.0], quat)
            moved = wait_for_obs(robot, lambda o: float(o["reward"]) > cfg.stand_walk.upright_weight + 0.3,
                                 "a progress reward")
            assert float(moved["reward"]) < cfg.stand_walk.upright_weight + cfg.stand_walk.progress_weight * 0.15
            assert robot.task.progress == pytest.approx(0.10, abs=0.03)
            # on its back: uprightness from the IMU turns negative, no progress counts
            pos, _, _ = rig.plant.base_state()
            rig.plant.set_base(pos + [0.0, 0.0, 0.1], [1.0, 0.0, 0.0, 0.0])  # rolled 180 deg about x
            flipped = wait_for_obs(robot, lambda o: float(o["imu_gravity"][2]) > 0.5, "the IMU seeing it flipped")
            assert float(flipped["reward"]) < 0
            # the next reset asks for a person; with no terminal it says so and carries on
            with caplog.at_level("WARNING", logger="reverie.servo"):
                robot.reset()
            assert any("a person is needed" in r.message and "upside down" in r.message for r in caplog.records)
