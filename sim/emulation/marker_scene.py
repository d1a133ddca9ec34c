"""Printed ArUco markers lying on a PyBullet table, seen by a camera with known intrinsics.

A second, independent renderer for `robot.sensors.markers`: the tracker's tests check poses it recovers from
PyBullet images against the poses the markers were placed at. Each marker is a textured quad (the
`generate_marker` image with a white paper margin) a fraction of a millimetre above a grey table.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from types import TracebackType

import cv2
import numpy as np
import pybullet as p

from robot.sensors.markers import CameraModel, generate_marker

PRINT_PX = 256  # texture resolution of the printed marker
PAPER = 0.25  # white margin around the black square, fraction of its side
LIFT_M = 0.0005  # height of the print above the table, so the two never z-fight
NEAR_M, FAR_M = 0.01, 5.0


def table_from_camera(eye: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """4x4 pose of a camera at `eye` looking at `target`, OpenCV axes (x right, y down, z forward).

    Image up follows table +z, or table +y when looking straight down, as `view_up` tells PyBullet.
    """
    eye_v, target_v = np.asarray(eye, np.float64), np.asarray(target, np.float64)
    forward = target_v - eye_v
    if np.linalg.norm(forward) < 1e-9:
        raise ValueError(f"camera eye {eye_v.tolist()} and target {target_v.tolist()} coincide")
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, view_up(forward))
    right /= np.linalg.norm(right)
    pose = np.eye(4)
    pose[:3, :3] = np.column_stack([right, np.cross(forward, right), forward])
    pose[:3, 3] = eye_v
    return pose


def view_up(forward: np.ndarray) -> np.ndarray:
    """Table +z as image up, unless the camera looks (nearly) along it."""
    return np.array([0.0, 1.0, 0.0]) if abs(forward[2]) > 0.999 else np.array([0.0, 0.0, 1.0])


def print_quad(client: int, directory: str, marker_id: int, size_m: float, dictionary: str = "DICT_4X4_50",
               paper: float = PAPER) -> int:
    """A printed marker as a visual-only textured quad (a body of no mass), facing +z, centred on its origin.

    The black square is `size_m` wide; the white paper around it adds `paper` times that on each side. The
    texture is written to `directory` (PyBullet loads textures from files).
    """
    margin = round(PRINT_PX * paper)
    path = os.path.join(directory, f"{dictionary}_{marker_id}_{margin}.png")
    cv2.imwrite(path, generate_marker(marker_id, PRINT_PX, dictionary, margin_px=margin))
    texture = p.loadTexture(path, physicsClientId=client)
    half = size_m / 2 * (1 + 2 * paper)
    quad = p.createVisualShape(
        p.GEOM_MESH, vertices=[[-half, half, 0], [half, half, 0], [half, -half, 0], [-half, -half, 0]],
        indices=[0, 2, 1, 0, 3, 2], uvs=[[0, 1], [1, 1], [1, 0], [0, 0]], normals=[[0, 0, 1]] * 4,
        physicsClientId=client,
    )
    body = p.createMultiBody(baseMass=0, baseVisualShapeIndex=quad, physicsClientId=client)
    p.changeVisualShape(body, -1, textureUniqueId=texture, rgbaColor=[1, 1, 1, 1], physicsClientId=client)
    return body


def render_view(client: int, width: int, height: int, supersample: int, view: Sequence[float],
                proj: Sequence[float]) -> np.ndarray:
    """RGB uint8 image of `client` through the `view` and `proj` matrices (PyBullet's CPU renderer).

    The renderer samples one point per pixel; a camera sensor integrates over the pixel. Rendering at
    `supersample` times the size and averaging blocks gives the sensor's soft edges, which sub-pixel
    corner refinement relies on.
    """
    w, h = width * supersample, height * supersample
    _, _, rgba, _, _ = p.getCameraImage(
        w, h, view, proj, renderer=p.ER_TINY_RENDERER, flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=client
    )
    rgb = np.asarray(rgba, np.uint8).reshape(h, w, 4)[..., :3]
    if supersample == 1:
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


class MarkerScene:
    """A table, markers on it and one camera; a context manager that frees the PyBullet client."""

    def __init__(
        self, width: int, height: int, fov_deg: float, eye: Sequence[float], target: Sequence[float],
        marker_size_m: float, supersample: int = 2,
    ) -> None:
        if supersample < 1:
            raise ValueError(f"MarkerScene: supersample must be >= 1, got {supersample}")
        self.width, self.height, self.fov_deg, self.supersample = width, height, fov_deg, supersample
        self.camera = CameraModel.from_fov(width, height, fov_deg)
        self.table_from_camera = table_from_camera(eye, target)
        self.marker_size_m = marker_size_m
        forward = self.table_from_camera[:3, 2]
        self._view = p.computeViewMatrix(list(eye), list(target), view_up(forward).tolist())
        self._proj = p.computeProjectionMatrixFOV(fov_deg, width / height, NEAR_M, FAR_M)
        self._textures = tempfile.TemporaryDirectory(prefix="reverie-markers-")
        self.client = p.connect(p.DIRECT)
        self._add_table()

    def _add_table(self) -> None:
        shape = p.createVisualShape(
            p.GEOM_BOX, halfExtents=[1.0, 1.0, 0.01], rgbaColor=[0.55, 0.45, 0.35, 1], physicsClientId=self.client
        )
        p.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, basePosition=[0, 0, -0.01],
                          physicsClientId=self.client)

    def add_marker(self, marker_id: int, position: Sequence[float], heading: float,
                   dictionary: str = "DICT_4X4_50", size_m: float | None = None) -> int:
        """Lays marker `marker_id` flat at table `position` (x, y[, z]) turned by `heading` rad; its body id.
        `size_m` overrides the scene's marker size (a larger table marker)."""
        body = print_quad(self.client, self._textures.name, marker_id, size_m or self.marker_size_m, dictionary)
        self.move_marker(body, position, heading)
        return body

    def move_marker(self, body: int, position: Sequence[float], heading: float) -> None:
        """Places a marker (as an object carrying it would move it) on the table."""
        x, y, *z = position
        at = [x, y, (z[0] if z else 0.0) + LIFT_M]
        turn = p.getQuaternionFromEuler([0.0, 0.0, heading])
        p.resetBasePositionAndOrientation(body, at, turn, physicsClientId=self.client)

    def render(self) -> np.ndarray:
        """The camera's RGB uint8 view (PyBullet's CPU renderer, supersampled: see `render_view`)."""
        return render_view(self.client, self.width, self.height, self.supersample, self._view, self._proj)

    def close(self) -> None:
        if self.client >= 0:
            p.disconnect(self.client)
            self.client = -1
        self._textures.cleanup()

    def __enter__(self) -> MarkerScene:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

