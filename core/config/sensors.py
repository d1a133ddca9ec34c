"""Config blocks of a real robot's sensors (`sensors:`: camera, IMU) and of marker tracking (`markers:`),
whose table-frame positions the real tasks (`core.config.real_tasks`) turn into rewards.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from core.config.base import Block, FieldError

Crop = Annotated[list[int], Field(min_length=4, max_length=4)]
Distortion = Annotated[list[float], Field(min_length=5, max_length=5)]

# The camera watchdog (`sensors.camera.dead_after_s`, and `reverie-robot camera --dead-after-s`): 2 s without a
# frame means a webcam is gone; a camera drawn in software on a busy machine (`reverie-sim emulate`) can need
# more. A watchdog that waits over a minute watches nothing.
DEAD_AFTER_S, MAX_DEAD_AFTER_S = 2.0, 60.0


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
    max_age_ms: float = Field(
        150.0, gt=0, description="a frame older than this is stale: the robot stops, ms (below dead_after_s)"
    )
    dead_after_s: float = Field(
        DEAD_AFTER_S, gt=0, le=MAX_DEAD_AFTER_S, description="no frame for this long (the first one included): "
        "the camera is dead, s; raise it for a camera drawn in software on a busy machine, not for a webcam"
    )
    fov_deg: float | None = Field(
        None, gt=1, lt=170, description="vertical field of view, deg: approximate intrinsics when none are given"
    )
    intrinsics: IntrinsicsConfig | None = Field(None, description="calibrated intrinsics (preferred over fov_deg)")

    @model_validator(mode="after")
    def _stale_before_dead(self) -> CameraDeviceConfig:
        # The reader calls a camera dead first: a stale limit at or past the dead time would never apply.
        if self.max_age_ms >= 1000 * self.dead_after_s:
            raise FieldError("max_age_ms", f"a value below dead_after_s ({1000 * self.dead_after_s:g} ms): a frame "
                             "that old means a dead camera, not a stale one", self.max_age_ms)
        return self


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
