"""Marker positions on the table, from a fixed camera, remembered between sightings.

The table frame is the frame of one marker lying flat on the table (`markers.table_id`): no extrinsic
calibration step, and moving the camera only means the table marker is seen again. Its pose is averaged
over sightings (a running mean that settles to a slow moving average) since every single-frame pose
carries pixel noise; an arm may cover it for a while without harm, as the camera does not move. A sudden
jump of the table marker (the camera was bumped) restarts the average.

Other markers are expressed in that frame and remembered with the time they were last seen, so a task
can use a position a few frames old and decide when "not seen for too long" means the reward is unknown.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from core.config.sensors import CameraDeviceConfig, MarkersConfig
from robot.sensors.markers import CameraModel, MarkerPose, MarkerTracker

log = logging.getLogger(__name__)

SETTLED_WEIGHT = 0.05  # weight of a new table-marker sighting once the average has settled
JUMP_M = 0.05  # a table-marker sighting this far from the average means the camera moved


@dataclass(frozen=True)
class Sighting:
    """Where a marker was last seen, in the table frame."""

    position: np.ndarray  # (3,) m
    heading: float  # rad, about the table's z axis
    time: float  # time.monotonic() of the frame it was seen in


def camera_model(cam: CameraDeviceConfig) -> CameraModel:
    """Intrinsics of the image the tracker sees: calibrated ones, or a pinhole from fov_deg (cropped either way)."""
    x0, y0, w, h = cam.crop or (0, 0, cam.width, cam.height)
    if cam.intrinsics is not None:
        i = cam.intrinsics
        return CameraModel(i.fx, i.fy, i.cx - x0, i.cy - y0, np.asarray(i.distortion, dtype=np.float64))
    if cam.fov_deg is None:
        raise ValueError("sensors.camera: intrinsics or fov_deg is needed to track markers")
    full = CameraModel.from_fov(cam.width, cam.height, cam.fov_deg)
    return CameraModel(full.fx, full.fy, full.cx - x0, full.cy - y0)


def _orthonormal(matrix: np.ndarray) -> np.ndarray:
    """The rotation nearest to `matrix` (an average of rotations is not one)."""
    u, _, vt = np.linalg.svd(matrix)
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        u[:, -1] *= -1
        rot = u @ vt
    return rot


class TableTracker:
    """Finds markers in full-resolution frames and keeps their table-frame positions."""

    def __init__(self, camera: CameraModel, markers: MarkersConfig) -> None:
        self.table_id = markers.table_id
        # A pinhole sees a marker twice as big at the same pixels twice as far: scale the table marker's position.
        self._table_scale = (markers.table_size_m or markers.size_m) / markers.size_m
        self._tracker = MarkerTracker(camera, markers.size_m, markers.dictionary)
        self._rot = np.eye(3)  # camera_from_table, averaged
        self._origin = np.zeros(3)
        self._table_sightings = 0
        self._seen: dict[int, Sighting] = {}

    @property
    def table_found(self) -> bool:
        return self._table_sightings > 0

    def update(self, image_rgb: np.ndarray, time: float) -> dict[int, Sighting]:
        """Detect markers in one frame; returns those seen in it (empty until the table marker was seen once)."""
        # markers face up from the table: once its frame is known, that picks each marker's pose (see detect)
        facing = self._rot[:, 2] if self.table_found else None
        poses = self._tracker.detect(image_rgb, time, facing)
        table = poses.pop(self.table_id, None)
        if table is not None:
            self._update_table(table)
        if not self.table_found:
            return {}
        seen = {marker_id: self._to_table(pose) for marker_id, pose in poses.items()}
        self._seen.update(seen)
        return seen

    def _update_table(self, pose: MarkerPose) -> None:
        pose = replace(pose, position=pose.position * self._table_scale)
        if self.table_found and np.linalg.norm(pose.position - self._origin) > JUMP_M:
            log.warning("table marker %d moved %.3f m in the image: the camera moved? restarting the table frame",
                        self.table_id, float(np.linalg.norm(pose.position - self._origin)))
            self._table_sightings = 0
            self._seen.clear()  # positions in the old frame mean nothing now
        self._table_sightings += 1
        weight = max(1.0 / self._table_sightings, SETTLED_WEIGHT)
        self._origin = (1 - weight) * self._origin + weight * pose.position
        self._rot = _orthonormal((1 - weight) * self._rot + weight * pose.rotation)

    def _to_table(self, pose: MarkerPose) -> Sighting:
        position = self._rot.T @ (pose.position - self._origin)
        x_axis = self._rot.T @ pose.rotation[:, 0]
        return Sighting(position, math.atan2(x_axis[1], x_axis[0]), pose.time)

    def last(self, marker_id: int) -> Sighting | None:
        """Where `marker_id` was last seen (None: never, or not since the table frame was last restarted)."""
        return self._seen.get(marker_id)

    def age(self, marker_id: int, now: float) -> float:
        """Seconds since `marker_id` was last seen (inf: never)."""
        seen = self._seen.get(marker_id)
        return math.inf if seen is None else now - seen.time
