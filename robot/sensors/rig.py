"""The sensors of a real robot beyond its servos: a fixed camera (images and marker tracking) and an IMU.

Built from the `sensors:` and `markers:` config blocks. The camera is read in its own thread; each control
step takes its latest frame (stale or dead cameras raise `CameraError`, which stops the robot), runs the
marker tracker on the full-resolution image when the frame is new, and reads the IMU once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.config import MARKER_TASKS, Config
from robot.sensors.camera import Camera
from robot.sensors.imu import BNO055, ImuReading
from robot.sensors.tracking import TableTracker, camera_model


@dataclass(frozen=True)
class SensorFrame:
    image: np.ndarray | None  # the model's image (camera.width x camera.height RGB), when there is a camera
    imu: ImuReading | None
    time: float


class Sensors:
    """Camera, marker tracker and IMU of one robot; `source` replaces the configured camera device (tests)."""

    def __init__(self, cfg: Config, source: Any = None) -> None:
        self.cfg = cfg
        cam = cfg.sensors.camera
        tracking = cfg.task in MARKER_TASKS
        self.camera = None
        if cam is not None and (cfg.camera.enabled or tracking):
            self.camera = Camera(
                source if source is not None else _device(cam.device), cam.width, cam.height,
                fps=cam.fps, pixel_format=cam.pixel_format, out_size=(cfg.camera.width, cfg.camera.height),
                crop=tuple(cam.crop) if cam.crop else None, max_age_s=cam.max_age_ms / 1000,
                dead_after_s=cam.dead_after_s, keep_full=tracking,
            )
        self.tracker = TableTracker(camera_model(cam), cfg.markers) if tracking and cam is not None else None
        imu = cfg.sensors.imu
        self.imu = BNO055(imu.port, imu.baud, retries=imu.retries) if imu is not None else None
        self._last_index = -1

    def start(self) -> Sensors:
        try:
            if self.camera is not None:
                self.camera.start()
            if self.imu is not None:
                self.imu.open()
        except BaseException:
            self.close()
            raise
        return self

    def read(self) -> SensorFrame:
        """The latest camera frame (tracked when new) and one IMU reading."""
        image = self._track() if self.camera is not None else None
        reading = self.imu.read() if self.imu is not None else None
        return SensorFrame(image, reading, time.monotonic())

    def _track(self) -> np.ndarray:
        """The model's image of the newest frame, after running the tracker on it if it is new."""
        frame = self.camera.latest()
        if self.tracker is not None and frame.index != self._last_index and frame.full is not None:
            self.tracker.update(frame.full, frame.time)
        self._last_index = frame.index
        return frame.image

    def fresh(self, frames: int = 2, timeout_s: float = 5.0) -> SensorFrame:
        """Wait until `frames` new camera frames were tracked (after a reset motion: see the scene as it is now),
        then read everything once."""
        if self.camera is not None:
            start = self._last_index
            deadline = time.monotonic() + timeout_s
            self._track()
            while self._last_index < start + frames and time.monotonic() < deadline:
                time.sleep(0.01)
                self._track()
        return self.read()

    def close(self) -> None:
        if self.camera is not None:
            self.camera.close()
        if self.imu is not None:
            self.imu.close()


def _device(device: str) -> str | int:
    """A bare number names /dev/videoN by index, as OpenCV does."""
    return int(device) if device.isdigit() else device
