"""The one table of tasks: adding a task is one entry here, one settings block and the code it names.

Everything else reads this table: the config's task names, which backend may run each and which need
marker tracking (`TaskName`, `SIM_TASKS`, `SERVO_TASKS`, `MARKER_TASKS`; the `Config` field of the same
name holds a task's settings), the Gymnasium ids `sim` registers and `reverie-learner train` makes, the
simulated robots `sim.tasks` builds and the real tasks `robot.real_tasks` builds. Code is named by
"module:attribute" strings and imported only when a task is built, so the config (which a robot reads
first, on a computer with no simulator) imports no simulator or robot code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class TaskSpec:
    """One task: who runs it and what builds it."""

    name: str  # also the name of its settings block in `Config`
    backend: Literal["sim", "servo"]
    factory: str  # "module:Class": the simulated robot (`Class(cfg)`) or real task (`Class(cfg, names, home)`)
    tracks_markers: bool = False  # a servo task whose reward comes from ArUco markers: it needs a camera model
    scripted: str | None = None  # "module:Class": a privileged-state controller that solves a simulated task
    gym_id: str | None = None  # a simulated task's Gymnasium id
    default_config: str | None = None  # a simulated task's file in hardware_configs/


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arm_reach", "sim", "sim.arm_reach:ArmReach", scripted="sim.arm_reach:ReachScripted",
                 gym_id="reverie/ArmReach-v0", default_config="sim_arm_reach.yaml"),
        TaskSpec("arm_pick", "sim", "sim.arm_pick:ArmPick", scripted="sim.arm_pick:PickScripted",
                 gym_id="reverie/ArmPick-v0", default_config="sim_arm_pick.yaml"),
        TaskSpec("quadruped_walk", "sim", "sim.quadruped_walk:QuadrupedWalk",
                 gym_id="reverie/QuadrupedWalk-v0", default_config="sim_quadruped_walk.yaml"),
        TaskSpec("joint_reach", "servo", "robot.real_tasks:JointReach"),
        TaskSpec("marker_reach", "servo", "robot.real_tasks:MarkerReach", tracks_markers=True),
        TaskSpec("pick_place", "servo", "robot.real_tasks:PickPlace", tracks_markers=True),
        TaskSpec("stand_walk", "servo", "robot.real_tasks:StandWalk", tracks_markers=True),
    )
}

TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the config's `task` field: one of the names above
TASK_BLOCKS: tuple[str, ...] = tuple(TASKS)
SIM_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.backend == "sim")
SERVO_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.backend == "servo")
MARKER_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.tracks_markers)


def load(path: str) -> Any:
    """The object a "module:attribute" path of the table names, its module imported on first use."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
