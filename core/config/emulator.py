"""Config block of the emulated servo bus that stands in for hardware (`emulator:`, `reverie-sim emulate`):
the model its servos drive, its camera, markers, object and IMU. Positions are world-frame metres.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config.base import Block, Vec3


class EmulatedCameraConfig(Block):
    """Where the emulated scene's camera is; its frames are what `sensors.camera` reads."""

    eye: Vec3 = Field([0.25, 0.0, 0.9], description="camera position, world frame, m")
    target: Vec3 = Field([0.25, 0.0, 0.0], description="point looked at, world frame, m")
    fov_deg: float = Field(60.0, gt=1, lt=170, description="vertical field of view, degrees")
    width: int = Field(640, ge=16, le=1920, description="image width, pixels")
    height: int = Field(480, ge=16, le=1080, description="image height, pixels")
    fps: float = Field(15.0, gt=0, le=60, description="frames rendered per second")
    supersample: int = Field(
        1, ge=1, le=4, description="render at this multiple of the size and average down (soft edges like a lens; "
        "each step costs the square in render time: 2 is about 350 ms a 640x480 frame here)"
    )


class EmulatedMarkerConfig(Block):
    """An ArUco marker of `markers.dictionary` and `markers.size_m`, lying flat (facing up)."""

    id: int = Field(ge=0, description="marker id")
    link: str | None = Field(None, description="robot link carrying it (null: the table)")
    position: Vec3 = Field([0.0, 0.0, 0.0], description="world position (table) or offset in the link frame, m")
    heading: float = Field(0.0, description="rotation about the vertical axis, rad")


class EmulatedObjectConfig(Block):
    """A cube on the table with a marker on its top face."""

    marker_id: int = Field(ge=0, description="id of the marker on top")
    size: float = Field(0.035, gt=0.005, le=0.2, description="cube side, m")
    mass: float = Field(0.03, gt=0, le=2, description="mass, kg")
    position: Vec3 = Field([0.2, 0.1, 0.0], description="start position of the cube's bottom centre, world frame, m")


class EmulatorConfig(Block):
    """The emulated servo bus (`reverie-sim emulate`): PyBullet physics behind the real protocol."""

    model: Literal["so101", "koch", "quadruped12"] | None = Field(
        None, description="PyBullet model whose joints the emulated servos drive"
    )
    offset_spread: int = Field(
        0, ge=0, le=1024, description="raw zero of each emulated servo is 2048 +- up to this many ticks (seeded), "
        "so that calibration has something to find"
    )
    physics_hz: float = Field(240.0, gt=0, le=2000, description="physics rate, Hz, stepped in real time")
    camera: EmulatedCameraConfig | None = Field(
        None, description="a fixed camera rendering the emulated scene, served as an MJPEG stream over HTTP"
    )
    markers: list[EmulatedMarkerConfig] = Field(
        default_factory=list, description="printed ArUco markers in the scene (on the table or on robot links)"
    )
    object: EmulatedObjectConfig | None = Field(None, description="a cube with a marker on top (pick and place)")
    imu: bool = Field(False, description="an emulated BNO055 on its own pseudo-terminal, driven by the robot's base")
