"""A leader arm and an SO-101 follower on two emulated Feetech buses (kinematic plants, pseudo-terminals), with
their calibration files and the config overrides that point at them: for the teleoperation tests
(tests/robot/test_teleop.py, tests/learner/test_record_leader.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config import load_config
from robot.emulated.servo_bus import KinematicPlant
from sim.emulation.rig import emulate, true_calibration

ROOT = Path(__file__).resolve().parents[1]
SO101 = ROOT / "hardware_configs" / "so101_arm.yaml"
LEADER = ROOT / "hardware_configs" / "so101_leader.yaml"
PROPRIO = ("task=joint_reach", "camera.enabled=false", "sensors.camera=null", "sensors.imu=null",
           "safety.estop_key=false", "safety.watchdog_s=2.0", "motors.timeout_margin_ms=100",
           "motors.read_budget_ms=400")


class Pair:
    """A follower and a leader bus, each an emulator with a kinematic plant and its calibration file."""

    def __init__(self, tmp: Path, *follower_sets: str) -> None:
        base = load_config(SO101, [*PROPRIO, *follower_sets])
        true_calibration(base).save(tmp / "follower.json")
        self.follower_plant = KinematicPlant(6, initial=[s.home for s in base.motors.servos])
        self.follower_bus = emulate(base, plant=self.follower_plant).start()
        leader = load_config(LEADER)
        true_calibration(leader).save(tmp / "leader.json")
        self.leader_home = np.array([s.home for s in leader.motors.servos])
        self.leader_plant = KinematicPlant(6, initial=self.leader_home)
        self.leader_bus = emulate(leader, plant=self.leader_plant).start()
        self.follower_sets = [*PROPRIO, *follower_sets, f"motors.port={self.follower_bus.port}",
                              f"motors.calibration={tmp / 'follower.json'}"]
        self.leader_sets = [f"motors.port={self.leader_bus.port}", f"motors.calibration={tmp / 'leader.json'}"]
        self.follower_cfg = load_config(SO101, self.follower_sets)
        self.leader_cfg = load_config(LEADER, self.leader_sets)

    def close(self) -> None:
        self.follower_bus.close()
        self.leader_bus.close()
