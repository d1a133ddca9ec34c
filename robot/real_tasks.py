"""Tasks on real robots: rewards and success from what the robot senses, not from a simulator's state.

- `joint_reach`: bring the joints to a target pose (proprioception only; no camera needed).
- `marker_reach`: bring the marker on the gripper to a target marker on the table.
- `pick_place`: move the object (a marker on top) into the other of two regions; the goal is whichever
  region the object is not in, so one success sets up the next episode and a person only steps in when
  the object ends up elsewhere.
- `stand_walk`: a quadruped starts folded on the floor, stands up (uprightness from the IMU) and walks
  forward (progress of the marker on its back along `forward`).

A task sees one `Reading` per control step. `begin` runs after the scripted reset motion and returns a
request for a person when the scene is not ready (the operator prompt shows it); `step` returns the
reward, the success flag, whether the task ended (terminal) and whether the episode must end because the
reward cannot be known (a marker unseen for `markers.max_lost_s`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from core.config import Config
from core.config.real_tasks import RegionConfig
from core.config.tasks import TASKS, load
from core.interface import ArraySpec
from robot.sensors.imu import world_up_in_body
from robot.sensors.tracking import TableTracker


@dataclass(frozen=True)
class Reading:
    """What the robot sensed at one control step."""

    joint_pos: np.ndarray  # rad, per servo
    time: float  # time.monotonic()
    tracker: TableTracker | None = None
    up: float | None = None  # body z axis . world up, from the IMU: 1 upright, 0 on its side, -1 upside down


@dataclass
class Outcome:
    reward: float = 0.0
    success: bool = False
    terminal: bool = False
    end: str | None = None  # the episode must end here, and why
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # the task's observation entries


class Task:
    """Base: no extra observations, reset to the home pose, nothing to ask a person.

    The task table (`core.config.tasks`) builds every real task as `Class(cfg, names, home)`: the config,
    the servo names in bus order and their home pose (rad).
    """

    name = "task"

    def __init__(self, cfg: Config, names: list[str], home: np.ndarray) -> None:
        self.cfg, self.names = cfg, names
        self.max_lost_s = cfg.markers.max_lost_s

    def observation_spec(self) -> dict[str, ArraySpec]:
        return {}

    def reset_pose(self, home: np.ndarray) -> np.ndarray:
        return home

    def begin(self, r: Reading) -> str | None:
        """Start an episode; a request for a person if the scene is not ready for one."""
        return None

    def step(self, r: Reading, first: bool) -> Outcome:
        raise NotImplementedError

    # helpers for marker tasks
    def _lost(self, r: Reading, marker_id: int, what: str) -> str | None:
        age = r.tracker.age(marker_id, r.time)
        if age > self.max_lost_s:
            seen = "never seen" if math.isinf(age) else f"not seen for {age:.1f} s"
            return f"marker {marker_id} ({what}) {seen} (markers.max_lost_s={self.max_lost_s}): reward unknown"
        return None

    def _position(self, r: Reading, marker_id: int) -> np.ndarray | None:
        seen = r.tracker.last(marker_id)
        return None if seen is None else seen.position


class JointReach(Task):
    name = "joint_reach"

    def __init__(self, cfg: Config, names: list[str], home: np.ndarray) -> None:
        super().__init__(cfg, names, home)
        self.target = np.array([cfg.joint_reach.target.get(n, h) for n, h in zip(names, home)])

    def step(self, r: Reading, first: bool) -> Outcome:
        return Outcome(reward=0.0 if first else -float(np.abs(r.joint_pos - self.target).mean()))


class MarkerReach(Task):
    name = "marker_reach"

    def __init__(self, cfg: Config, names: list[str], home: np.ndarray) -> None:
        super().__init__(cfg, names, home)
        self.c = cfg.marker_reach

    def observation_spec(self) -> dict[str, ArraySpec]:
        return {"target_pos": ArraySpec((3,), np.float32, unit="m", names=("x", "y", "z"),
                                        description="target marker, table frame (last seen)")}

    def begin(self, r: Reading) -> str | None:
        lost = self._lost(r, self.c.target_id, "target")
        return f"{lost}; put the target marker where the camera sees it" if lost else None

    def step(self, r: Reading, first: bool) -> Outcome:
        target = self._position(r, self.c.target_id)
        effector = self._position(r, self.c.effector_id)
        out = Outcome(extras={"target_pos": (target if target is not None else np.zeros(3)).astype(np.float32)})
        if not first:  # the target lies still: the gripper may cover it once it was seen at the start
            out.end = self._lost(r, self.c.effector_id, "gripper")
        if target is None or effector is None:
            return out
        distance = float(np.linalg.norm(effector - target))
        out.success = distance < self.c.success_distance
        if not first:
            out.reward = -distance
            out.terminal = out.success and self.c.terminate_on_success
        return out


class PickPlace(Task):
    name = "pick_place"

    def __init__(self, cfg: Config, names: list[str], home: np.ndarray) -> None:
        super().__init__(cfg, names, home)
        assert cfg.pick_place is not None  # the config validator guarantees it for this task
        self.c = cfg.pick_place
        self.regions = self.c.regions
        self.goal = 1  # region index the object must go to; set from where the object is at each begin

    def observation_spec(self) -> dict[str, ArraySpec]:
        return {
            "object_pos": ArraySpec((3,), np.float32, unit="m", names=("x", "y", "z"),
                                    description="object marker, table frame (last seen)"),
            "goal": ArraySpec((2,), np.float32, unit="m", names=("x", "y"), description="centre of the goal region"),
        }

    def region_of(self, position: np.ndarray) -> int | None:
        """The region the object rests in (None: in neither, or lifted)."""
        if position[2] > self.c.rest_height:
            return None
        for i, region in enumerate(self.regions):
            if _inside(position, region):
                return i
        return None

    def begin(self, r: Reading) -> str | None:
        where = "put it in region A or B"
        lost = self._lost(r, self.c.object_id, "object")
        if lost:
            return f"{lost}; {where}"
        position = self._position(r, self.c.object_id)
        region = self.region_of(position)
        if region is None:
            x, y, z = position
            return f"the object is at ({x:.2f}, {y:.2f}, {z:.2f}) m, in neither region; {where}"
        self.goal = 1 - region
        return None

    def _centre(self) -> np.ndarray:
        region = self.regions[self.goal]
        return 0.5 * (np.asarray(region.low) + np.asarray(region.high))

    def step(self, r: Reading, first: bool) -> Outcome:
        centre = self._centre()
        obj = self._position(r, self.c.object_id)
        out = Outcome(extras={"object_pos": (obj if obj is not None else np.zeros(3)).astype(np.float32),
                              "goal": centre.astype(np.float32)})
        if not first:
            out.end = self._lost(r, self.c.object_id, "object")
        if obj is None:
            return out
        out.success = self.region_of(obj) == self.goal
        if first:
            return out
        reward = -self.c.place_weight * float(np.linalg.norm(obj[:2] - centre))
        effector = self._position(r, self.c.effector_id) if self.c.effector_id is not None else None
        if effector is not None:
            reward -= self.c.reach_weight * float(np.linalg.norm(effector - obj))
        out.reward = reward + (self.c.success_bonus if out.success else 0.0)
        return out


def _inside(position: np.ndarray, region: RegionConfig) -> bool:
    return bool(np.all(position[:2] >= region.low) and np.all(position[:2] <= region.high))


class StandWalk(Task):
    name = "stand_walk"

    def __init__(self, cfg: Config, names: list[str], home: np.ndarray) -> None:
        super().__init__(cfg, names, home)
        self.c = cfg.stand_walk
        forward = np.asarray(self.c.forward, dtype=np.float64)
        self.forward = forward / np.linalg.norm(forward)
        self._last: np.ndarray | None = None  # body position at the previous step
        self.progress = 0.0  # forward distance walked this episode, m

    def reset_pose(self, home: np.ndarray) -> np.ndarray:
        pose = home.copy()
        for i, name in enumerate(self.names):
            pose[i] = self.c.rest_pose.get(name, pose[i])
        return pose

    def begin(self, r: Reading) -> str | None:
        if r.up is not None and r.up < self.c.flipped_below:
            return f"the robot is upside down or on its side (uprightness {r.up:+.2f}); set it on its feet"
        lost = self._lost(r, self.c.body_id, "body")
        if lost:
            return f"{lost}; carry the robot back into the camera's view"
        self._last = self._position(r, self.c.body_id)[:2].copy()
        self.progress = 0.0
        return None

    def step(self, r: Reading, first: bool) -> Outcome:
        up = 1.0 if r.up is None else r.up
        out = Outcome()
        body = self._position(r, self.c.body_id)
        if not first:
            out.end = self._lost(r, self.c.body_id, "body")
        step = 0.0
        if body is not None:
            if self._last is not None and up >= self.c.upright_min:
                step = float(np.dot(body[:2] - self._last, self.forward))
            self._last = body[:2].copy()
        if first:
            return out
        self.progress += step
        out.reward = self.c.upright_weight * up + self.c.progress_weight * step
        out.success = self.progress >= self.c.success_distance
        return out


def make_task(cfg: Config, names: list[str], home: np.ndarray) -> Task:
    """The real task `cfg.task` names, as the task table says to build it."""
    spec = TASKS.get(cfg.task)
    if spec is None or spec.backend != "servo":
        raise ValueError(f"task {cfg.task!r} is not a servo task")
    return load(spec.factory)(cfg, names, home)


def upright(quaternion_wxyz: np.ndarray) -> float:
    """z of the body's up axis in the world frame, from the IMU quaternion (w, x, y, z)."""
    return float(world_up_in_body(quaternion_wxyz)[2])


def gravity_in_body(quaternion_wxyz: np.ndarray) -> np.ndarray:
    """Unit gravity direction in the body frame ((0, 0, -1) upright): what a policy needs to balance."""
    return -world_up_in_body(quaternion_wxyz).astype(np.float32)
