"""Config blocks of the simulated robots: physics (`sim:`), domain randomisation (`randomization:`)
and the PyBullet tasks (`arm_reach:`, `arm_pick:`, `quadruped_walk:`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError, Range, Vec3


def _check_range(key: str, lo_hi: list[float], lower: float = -math.inf) -> None:
    lo, hi = lo_hi
    if not lo <= hi:
        raise FieldError(key, "[low, high] with low <= high", lo_hi)
    if lo < lower:
        raise FieldError(key, f"values >= {lower}", lo_hi)


def _check_box(key_low: str, low: list[float], high: list[float]) -> None:
    if any(a > b for a, b in zip(low, high)):
        raise FieldError(key_low, f"every element <= the matching high bound {high}", low)


class SimConfig(Block):
    physics_hz: float = Field(240.0, gt=0, le=20000, description="physics substep rate, Hz")
    render_proxy: bool = Field(
        True, description="render links with their (light) collision meshes instead of the detailed visual meshes"
    )


class RandomizationConfig(Block):
    """Domain randomisation, applied at every reset. The defaults change nothing."""

    colors: bool = Field(False, description="random colours for floor, objects and robot links")
    lighting: bool = Field(False, description="random light direction and ambient/diffuse/specular coefficients")
    camera_jitter: float = Field(0.0, ge=0, le=0.5, description="std of eye/target position noise, m")
    friction: Range = Field([1.0, 1.0], description="lateral friction multiplier, uniform [low, high]")
    mass_scale: Range = Field([1.0, 1.0], description="link mass multiplier, uniform [low, high]")

    @model_validator(mode="after")
    def _ranges(self) -> RandomizationConfig:
        _check_range("friction", self.friction, lower=0.0)
        _check_range("mass_scale", self.mass_scale, lower=1e-3)
        return self


class ArmReachConfig(Block):
    action_mode: Literal["joint", "cartesian"] = Field("cartesian", description="what the action in [-1, 1] moves")
    joint_delta: float = Field(0.1, gt=0, le=1.0, description="joint step at |action| = 1, rad")
    cartesian_delta: float = Field(0.04, gt=0, le=0.2, description="end-effector step at |action| = 1, m")
    success_distance: float = Field(0.03, gt=0, description="tool within this of the target counts as success, m")
    terminate_on_success: bool = Field(False, description="end the episode (terminal) on success")
    observe_target: bool = Field(
        False, description="add the marker's position (m, base frame) to the observations as `target`: random "
        "targets learnable without the camera"
    )
    target_low: Vec3 = Field([0.25, -0.2, 0.1], description="lower corner of the target sampling box, m")
    target_high: Vec3 = Field([0.5, 0.2, 0.35], description="upper corner of the target sampling box, m")
    workspace_low: Vec3 = Field([0.15, -0.35, 0.05], description="the end-effector goal is clamped to this box, m")
    workspace_high: Vec3 = Field([0.6, 0.35, 0.5], description="upper corner of the workspace box, m")

    @model_validator(mode="after")
    def _boxes(self) -> ArmReachConfig:
        _check_box("target_low", self.target_low, self.target_high)
        _check_box("workspace_low", self.workspace_low, self.workspace_high)
        return self


class ArmPickConfig(Block):
    action_mode: Literal["discrete", "cartesian"] = Field(
        "discrete", description="discrete: DayDreamer's six actions; cartesian: [dx, dy, dz, gripper] in [-1, 1]"
    )
    move_step: float = Field(0.04, gt=0, le=0.2, description="x/y step of a discrete action, m")
    cartesian_delta: float = Field(0.03, gt=0, le=0.2, description="end-effector step at |action| = 1, m")
    num_objects: int = Field(1, ge=1, le=4, description="objects placed in the source bin")
    object_size: float = Field(0.035, ge=0.02, le=0.05, description="edge of the cube objects, m")
    object_spread: float = Field(
        0.06, ge=0.0, le=0.07, description="objects start uniformly within +-this of the source bin's centre (x, y), m"
    )
    carry_height: float = Field(0.12, gt=0, le=0.5, description="tool height of the discrete 'up' state, m")
    grasp_height: float = Field(0.025, gt=0, le=0.5, description="tool height of the discrete 'down' state, m")
    lift_height: float = Field(
        0.03, gt=0, le=0.2, description="a held object is grasped once raised this far above its resting height, m"
    )
    workspace_low: Vec3 = Field([0.36, -0.3, 0.025], description="end-effector box, lower corner, m")
    workspace_high: Vec3 = Field([0.64, 0.3, 0.3], description="end-effector box, upper corner, m")
    grasp_reward: float = Field(1.0, description="reward when an object becomes grasped (held and lifted)")
    drop_penalty: float = Field(-1.0, description="reward when a released object comes to rest outside the target bin")
    place_reward: float = Field(10.0, description="reward the first time an object comes to rest in the target bin")

    @model_validator(mode="after")
    def _boxes(self) -> ArmPickConfig:
        _check_box("workspace_low", self.workspace_low, self.workspace_high)
        low, high = self.workspace_low[2], self.workspace_high[2]
        for key in ("grasp_height", "carry_height"):
            value = getattr(self, key)
            if not low <= value <= high:
                raise FieldError(key, f"a height inside the workspace's z range [{low}, {high}]", value)
        if self.grasp_height >= self.carry_height:
            raise FieldError("grasp_height", f"a height below carry_height ({self.carry_height})", self.grasp_height)
        return self


class QuadrupedWalkConfig(Block):
    kp: Vec3 = Field([60.0, 60.0, 60.0], description="PD stiffness for hip, upper, lower joints, N·m/rad")
    kd: Vec3 = Field([1.5, 1.5, 1.5], description="PD damping for hip, upper, lower joints, N·m·s/rad")
    max_torque: Vec3 = Field([20.0, 33.5, 33.5], description="torque limit for hip, upper, lower joints, N·m")
    action_scale: Vec3 = Field([0.8, 1.2, 1.2], description="joint offset from the standing pose at |action| = 1, rad")
    filter_cutoff_hz: float | None = Field(
        1.5, gt=0, description="2nd-order Butterworth low-pass on targets at the policy rate; null disables it"
    )
    reset_mode: Literal["reset", "reset_free"] = Field(
        "reset_free", description="reset: teleport to the initial pose each episode; reset_free: never teleport"
    )
    initial_pose: Literal["stand", "back", "random"] = Field(
        "back", description="pose of the first episode (and of every episode in reset mode)"
    )
    target_velocity: float = Field(0.3, gt=0, le=3.0, description="forward speed that earns full reward, m/s")
    stage_threshold: float = Field(0.7, gt=0, le=1.0, description="a reward stage counts once its term exceeds this")

    @model_validator(mode="after")
    def _positive(self) -> QuadrupedWalkConfig:
        for key in ("kp", "kd", "max_torque", "action_scale"):
            values = getattr(self, key)
            if any(v < 0 for v in values):
                raise FieldError(key, "three values >= 0", values)
        return self
