"""Config blocks of the tasks on real hardware: the proprioceptive `joint_reach:` and the marker tasks
that turn the camera's view into rewards (`marker_reach:`, `pick_place:`, `stand_walk:`).

Angles are calibrated joint angles in radians. Positions are in the table frame: the frame of the
marker `markers.table_id` lying flat on the table (origin at its centre, x to the right of the
printed image, y up it, z out of the table), in metres.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from core.config.base import Block, FieldError, Vec2


class JointReachConfig(Block):
    """A proprioceptive task for servo robots: bring the joints to a target pose."""

    target: dict[str, float] = Field(
        default_factory=dict, description="target angle per joint name, rad; joints not named aim at their home"
    )


class MarkerReachConfig(Block):
    """Arm reach to a marker: bring the marker on the gripper to the target marker on the table."""

    effector_id: int = Field(1, ge=0, description="marker on the gripper")
    target_id: int = Field(2, ge=0, description="marker on the table to reach")
    success_distance: float = Field(0.04, gt=0, description="effector within this of the target is success, m")
    terminate_on_success: bool = Field(False, description="end the episode (terminal) on success")


class RegionConfig(Block):
    low: Vec2 = Field(description="lower x, y corner of the region on the table, m")
    high: Vec2 = Field(description="upper x, y corner of the region on the table, m")

    @model_validator(mode="after")
    def _box(self) -> RegionConfig:
        if any(a >= b for a, b in zip(self.low, self.high)):
            raise FieldError("low", f"each element below the matching high bound {self.high}", self.low)
        return self


class PickPlaceConfig(Block):
    """Arm pick-and-place between two regions; the goal is whichever region the object is not in, so each
    success sets up the next episode and a person resets only when the object ends up elsewhere."""

    object_id: int = Field(3, ge=0, description="marker on top of the object")
    effector_id: int | None = Field(
        1, ge=0, description="marker on the gripper (shaping toward the object); null: none"
    )
    regions: list[RegionConfig] = Field(min_length=2, max_length=2, description="the two regions, table frame")
    rest_height: float = Field(
        0.06, gt=0, description="object marker at most this far above the table counts as put down, m"
    )
    reach_weight: float = Field(0.5, ge=0, description="weight of minus the gripper-to-object distance")
    place_weight: float = Field(1.0, ge=0, description="weight of minus the object-to-goal-centre distance")
    success_bonus: float = Field(1.0, ge=0, description="reward added while the object rests in the goal region")


class StandWalkConfig(Block):
    """Quadruped stand-up and walk forward: upright from the IMU, progress from the marker on its back."""

    body_id: int = Field(4, ge=0, description="marker on the robot's back")
    forward: Vec2 = Field([1.0, 0.0], description="direction of progress on the table (floor), table frame")
    rest_pose: dict[str, float] = Field(
        default_factory=dict, description="joint angles of the reset pose (legs folded), rad; others go home"
    )
    upright_weight: float = Field(1.0, ge=0, description="weight of uprightness (body z axis . world up, from IMU)")
    progress_weight: float = Field(10.0, ge=0, description="weight of forward progress per step, per metre")
    upright_min: float = Field(0.85, ge=-1, le=1, description="progress counts only while uprightness is above this")
    flipped_below: float = Field(
        -0.3, ge=-1, le=1, description="uprightness below this after a reset: ask a person to right the robot"
    )
    success_distance: float = Field(0.5, gt=0, description="forward progress within an episode that is success, m")

    @model_validator(mode="after")
    def _forward(self) -> StandWalkConfig:
        if abs(self.forward[0]) + abs(self.forward[1]) < 1e-9:
            raise FieldError("forward", "a non-zero direction", self.forward)
        return self
