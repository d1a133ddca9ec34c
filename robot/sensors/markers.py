"""Where things are on a real table, from a camera: ArUco marker poses.

Real tasks need rewards without a simulator's ground truth. A printed ArUco marker on an object gives its
position and heading (OpenCV's detector, then `solvePnP` with the square-marker IPPE solver).

Frames: the camera frame is OpenCV's (x right, y down, z along the optical axis, metres). A marker's own
frame has x to the right of the printed image, y up it, z out of the paper. Given `table_from_camera`
(a 4x4 homogeneous transform taking camera-frame points to table-frame points, z up from the table),
positions are reported in the table frame and the heading is the angle of the marker's x axis about the
table's z axis. Without it, positions are in the camera frame and the heading is about the optical axis
(the right thing for a camera looking straight down).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarkerPose:
    """One marker seen in one image."""

    id: int
    position: np.ndarray  # (3,) metres, camera frame, or table frame when a table transform is given
    heading: float  # rad, rotation of the marker's x axis about the table normal (or the optical axis)
    corners: np.ndarray  # (4, 2) pixel corners: top-left, top-right, bottom-right, bottom-left of the print
    time: float
    rotation: np.ndarray | None = None  # (3, 3) the marker's axes as columns, in the frame of `position`


@dataclass(frozen=True)
class CameraModel:
    """Pinhole intrinsics with OpenCV's 5-term distortion (k1, k2, p1, p2, k3); pixel centres at integers."""

    fx: float
    fy: float
    cx: float
    cy: float
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(5))

    def __post_init__(self) -> None:
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"camera model: {name} must be a positive focal length in pixels, got {value!r}")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"camera model: {name} must be finite, got {getattr(self, name)!r}")
        dist = np.asarray(self.distortion, dtype=np.float64).reshape(-1)
        if dist.shape != (5,) or not np.all(np.isfinite(dist)):
            raise ValueError(f"camera model: distortion must be 5 finite numbers (k1, k2, p1, p2, k3), got {dist}")
        object.__setattr__(self, "distortion", dist)

    @classmethod
    def from_fov(cls, width: int, height: int, fov_deg: float) -> CameraModel:
        """An ideal camera from a vertical field of view (as PyBullet and `CameraConfig.fov_deg` use)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"camera model: image size must be positive, got {width}x{height}")
        if not 0 < fov_deg < 180:
            raise ValueError(f"camera model: fov_deg must be in (0, 180), got {fov_deg}")
        f = (height / 2) / math.tan(math.radians(fov_deg) / 2)
        return cls(fx=f, fy=f, cx=(width - 1) / 2, cy=(height - 1) / 2)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], where: str = "camera") -> CameraModel:
        """From calibration output or a config block: keys fx, fy, cx, cy and optionally distortion."""
        unknown = set(values) - {"fx", "fy", "cx", "cy", "distortion"}
        if unknown:
            known = "fx, fy, cx, cy, distortion"
            raise ValueError(f"{where}: unknown intrinsics field(s) {sorted(unknown)}; expected {known}")
        missing = [k for k in ("fx", "fy", "cx", "cy") if k not in values]
        if missing:
            raise ValueError(f"{where}: missing intrinsics field(s) {missing}")
        numbers = {}
        for key in ("fx", "fy", "cx", "cy"):
            try:
                numbers[key] = float(values[key])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{where}.{key}: expected a number, got {values[key]!r}") from None
        dist = values.get("distortion", [0.0] * 5)
        try:
            return cls(**numbers, distortion=np.asarray(dist, dtype=np.float64))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 intrinsic matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


def aruco_dictionary(name: str) -> cv2.aruco.Dictionary:
    """OpenCV's predefined dictionary by name (e.g. "DICT_4X4_50"); a clear error lists the valid names."""
    value = getattr(cv2.aruco, name, None) if name.startswith("DICT_") else None
    if not isinstance(value, int):
        names = sorted(n for n in dir(cv2.aruco) if n.startswith("DICT_"))
        raise ValueError(f"unknown ArUco dictionary {name!r}; choose one of {names}")
    return cv2.aruco.getPredefinedDictionary(value)


def generate_marker(id: int, pixels: int, dictionary: str = "DICT_4X4_50", margin_px: int = 0) -> np.ndarray:
    """A printable marker: uint8 grey image, the black square `pixels` wide inside a white margin.

    Print it with a white quiet zone around it (at least one cell wide; `margin_px` adds one) and measure the
    black square's side: that is the tracker's `marker_size_m`.
    """
    vocab = aruco_dictionary(dictionary)
    count = vocab.bytesList.shape[0]
    if not 0 <= id < count:
        raise ValueError(f"marker id {id} is not in {dictionary}, which has ids 0..{count - 1}")
    cells = vocab.markerSize + 2
    if pixels < cells:
        raise ValueError(f"marker of {dictionary} needs at least {cells} pixels across, got {pixels}")
    if margin_px < 0:
        raise ValueError(f"margin_px must be >= 0, got {margin_px}")
    image = cv2.aruco.generateImageMarker(vocab, id, pixels)
    return cv2.copyMakeBorder(image, *[margin_px] * 4, cv2.BORDER_CONSTANT, value=255)


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Checks an image is HxWx3 uint8: a BGR/grey/float mix-up must fail loudly, not detect nothing."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what}: expected an RGB uint8 image of shape (H, W, 3), got {got}")
    return image


def _check_transform(matrix: np.ndarray | None) -> np.ndarray | None:
    if matrix is None:
        return None
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"table_from_camera must be a 4x4 homogeneous transform, got shape {m.shape}")
    rot = m[:3, :3]
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6) or not np.isclose(np.linalg.det(rot), 1.0, atol=1e-6):
        raise ValueError("table_from_camera: the upper-left 3x3 block must be a rotation (orthonormal, det +1)")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"table_from_camera: the last row must be [0, 0, 0, 1], got {m[3]}")
    return m


class MarkerTracker:
    """Finds ArUco markers of one size and dictionary in RGB images and returns their poses."""

    def __init__(
        self,
        camera: CameraModel,
        marker_size_m: float,
        dictionary: str = "DICT_4X4_50",
        table_from_camera: np.ndarray | None = None,
    ) -> None:
        if not (math.isfinite(marker_size_m) and marker_size_m > 0):
            raise ValueError(f"marker_size_m must be a positive side length in metres, got {marker_size_m!r}")
        self.camera = camera
        self.marker_size_m = marker_size_m
        self.table_from_camera = _check_transform(table_from_camera)
        self._detector = cv2.aruco.ArucoDetector(aruco_dictionary(dictionary), cv2.aruco.DetectorParameters())
        self._detector_params_refine()
        h = marker_size_m / 2  # corner order of IPPE_SQUARE: top-left, top-right, bottom-right, bottom-left
        self._object = np.array([[-h, h, 0], [h, h, 0], [h, -h, 0], [-h, -h, 0]], dtype=np.float64)

    def _detector_params_refine(self) -> None:
        """Sub-pixel corner refinement: the default (none) costs millimetres of position at half a metre."""
        params = self._detector.getDetectorParameters()
        params.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX
        self._detector.setDetectorParameters(params)

    def detect(
        self, image_rgb: np.ndarray, time: float = 0.0, facing: np.ndarray | None = None
    ) -> dict[int, MarkerPose]:
        """Poses of the markers fully in view, by id. Ids seen twice are ambiguous and left out.

        A flat square seen from afar has two poses that fit its corners almost equally well (mirror images
        about the line of sight); the wrong one tilts the marker by tens of degrees and shifts its position
        by centimetres. `facing`, a camera-frame direction the markers' normals are known to be near (the
        table's up axis, for markers lying or mounted facing up), picks the solution nearest to it.

        A marker cut by the image edge is not decoded: ArUco rejects candidates closer than
        `minDistanceToBorder` (3 px) to it, so a half-seen marker never yields a skewed pose.
        """
        image = _rgb(image_rgb, "MarkerTracker.detect")
        corners, ids, _ = self._detector.detectMarkers(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        if ids is None:
            return {}
        found: dict[int, list[np.ndarray]] = {}
        for marker_id, quad in zip(ids.reshape(-1).tolist(), corners, strict=True):
            found.setdefault(int(marker_id), []).append(quad.reshape(4, 2).astype(np.float64))
        poses = {}
        for marker_id, quads in found.items():
            if len(quads) > 1:
                log.warning("marker %d seen %d times in one image: not reported", marker_id, len(quads))
                continue
            pose = self._pose(marker_id, quads[0], time, facing)
            if pose is not None:
                poses[marker_id] = pose
        return poses

    def _pose(self, marker_id: int, quad: np.ndarray, time: float, facing: np.ndarray | None) -> MarkerPose | None:
        count, rvecs, tvecs, _ = cv2.solvePnPGeneric(
            self._object, quad, self.camera.matrix, self.camera.distortion, flags=cv2.SOLVEPNP_IPPE_SQUARE
        )
        if not count:
            return None
        solutions = [(cv2.Rodrigues(r)[0], t) for r, t in zip(rvecs, tvecs)]  # best reprojection first
        if facing is not None:
            solutions.sort(key=lambda sol: -float(sol[0][:, 2] @ facing))
        rot, tvec = solutions[0]
        position = tvec.reshape(3)
        if self.table_from_camera is not None:
            position = self.table_from_camera[:3, :3] @ position + self.table_from_camera[:3, 3]
            rot = self.table_from_camera[:3, :3] @ rot
        heading = math.atan2(rot[1, 0], rot[0, 0])
        return MarkerPose(id=marker_id, position=position, heading=heading, corners=quad, time=time, rotation=rot)
