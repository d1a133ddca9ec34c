"""The task names and which backend runs each: the config's task blocks are named after them."""

from __future__ import annotations

from typing import Literal

TaskName = Literal["arm_reach", "arm_pick", "quadruped_walk", "joint_reach", "marker_reach", "pick_place", "stand_walk"]
TASK_BLOCKS: tuple[str, ...] = (
    "arm_reach", "arm_pick", "quadruped_walk", "joint_reach", "marker_reach", "pick_place", "stand_walk"
)
SIM_TASKS: tuple[str, ...] = ("arm_reach", "arm_pick", "quadruped_walk")
SERVO_TASKS: tuple[str, ...] = ("joint_reach", "marker_reach", "pick_place", "stand_walk")
MARKER_TASKS: tuple[str, ...] = ("marker_reach", "pick_place", "stand_walk")
