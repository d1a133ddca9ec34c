"""Config blocks of a real robot's sensors (`sensors:`), of marker tracking (`markers:`) and of the
tasks that turn them into rewards on real hardware (`marker_reach:`, `pick_place:`, `stand_walk:`).

Positions are in the table frame: the frame of the marker `markers.table_id` lying flat on the table
(origin at its centre, x to the right of the printed image, y up it, z out of the table), in metres.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from learner.config_base import Block
from learner.config_errors import FieldError

Vec2 = Annotated[list[float], Field(min_length=2, max_length=2)]
Crop = Annotated[list[int], Field(min_length=4, max_length=4)]
Distortion = Annotated[list[float], Field(min_length=5, max_length=5)]


class IntrinsicsConfig(Block):
    """Pinhole intrinsics of the capture resolution (OpenCV calibration output)."""

    fx: float = Field(gt=0, description="focal length x, pixels")
    fy: float = Field(gt=0, description="focal length y, pixels")
    cx: float = Field(description="principal point x, pixels")
    cy: float = Field(description="principal point y, pixels")
    distortion: Distortion = Field([0.0] * 5, description="k1, k2, p1, p2, k3")


class CameraDeviceConfig(Block):
    """A physical camera (or what stands in for one) read in a background thread."""

    device: str = Field(
        description="/dev/v4l/by-id/... (stable), /dev/videoN, a video file, or an http(s)/rtsp stream URL"
    )
    width: int = Field(640, ge=16, le=4096, description="capture width, pixels (read back and checked)")
    height: int = Field(480, ge=16, le=4096, description="capture height, pixels (read back and checked)")
    fps: float = Field(30.0, gt=0, le=240, description="capture rate, frames/s (read back and checked)")
    pixel_format: str | None = Field("MJPG", description="V4L2 fourcc to ask for (MJPG, YUYV); null: the default")
    crop: Crop | None = Field(None, description="[x, y, w, h] of the capture kept before resizing to the model size")
    max_age_ms: float = Field(150.0, gt=0, description="a frame older than this is stale: the robot stops, ms")
    dead_after_s: float = Field(2.0, gt=0, description="no frame for this long: the camera is dead, s")
    fov_deg: float | None = Field(
        None, gt=1, lt=170, description="vertical field of view, deg: approximate intrinsics when none are given"
    )
    intrinsics: IntrinsicsConfig | None = Field(None, description="calibrated intrinsics (preferred over fov_deg)")


class ImuConfig(Block):
    """A BNO055 on its UART interface (PS1 high), mounted with its axes along the body's (x forward, z up)."""

    port: str = Field(description="serial port of the IMU (prefer /dev/serial/by-id/...)")
    baud: int = Field(115200, gt=0, description="BNO055 UART rate, bit/s (fixed at 115200 on the chip)")
    retries: int = Field(3, ge=0, le=10, description="a failed or busy transaction is retried this many times")


class SensorsConfig(Block):
    """What a real robot senses beyond its servos."""

    camera: CameraDeviceConfig | None = Field(None, description="a fixed camera (images, marker tracking)")
    imu: ImuConfig | None = Field(None, description="a BNO055 IMU on the body (orientation, angular rate)")


class MarkersConfig(Block):
    """ArUco markers seen by the camera: rewards and success come from their table-frame positions."""

    dictionary: str = Field("DICT_4X4_50", description="OpenCV ArUco dictionary the markers are printed from")
    size_m: float = Field(0.04, gt=0, le=1.0, description="side of the black square of every marker, m")
    table_id: int = Field(0, ge=0, description="marker lying flat on the table that defines the table frame")
    table_size_m: float | None = Field(
        None, gt=0, le=1.0, description="side of the table marker if it differs from size_m, m; print it large: "
        "its orientation sets the whole frame, and a 1 deg tilt is 5 mm at 30 cm"
    )
    max_lost_s: float = Field(
        1.0, gt=0, description="a marker a reward needs unseen this long ends the episode (reward unknown), s"
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
